"""Real artifacts that packages on the registry ship (Dolphin's configuration, WordLlama's weights): a pinned wheel
downloaded once by the tests into ~/.cache/mm-test (or $MM_TEST_CACHE) and unpacked there, never committed."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def fetch_package(requirement: str, package: str, marker: str) -> Path:
    """The unpacked directory of `package` from the wheel of `requirement` (e.g. "wordllama==0.4.0.post1"); `marker`,
    a file inside it, says that an earlier download is complete."""
    cache = Path(os.environ.get("MM_TEST_CACHE", Path.home() / ".cache" / "mm-test")) / requirement.replace("==", "-")
    pkg = cache / "site" / package
    if not (pkg / marker).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        dl = cache / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
                        "-d", str(dl)], check=True, capture_output=True)
        with zipfile.ZipFile(next(dl.glob("*.whl"))) as z:
            z.extractall(cache / "unpack")
        shutil.rmtree(cache / "site", ignore_errors=True)
        (cache / "site").mkdir()
        (cache / "unpack" / package).rename(pkg)
    return pkg
