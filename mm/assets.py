"""Where the models shipped inside the package live."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def default_model_dir() -> Path:
    """The shipped default text model (trained by `mm train --recipe text-tiny`)."""
    path = PACKAGE_DIR / "models" / "text-tiny"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the shipped model is missing from {path}; reinstall the package or pass --model")
    return path
