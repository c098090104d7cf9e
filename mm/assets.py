"""Where the models shipped inside the package live."""
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped(name: str) -> Path:
    """The directory of the shipped model `name`, or a clear error if this install lacks it."""
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no shipped model {name!r} in {path}; pass --model DIR (a checkpoint directory)")
    return path


def default_model_dir() -> Path:
    """The shipped default text model (trained by `mm train --recipe text-tiny`)."""
    return shipped("text-tiny")


def default_multimodal_dir() -> Path:
    """The shipped multimodal model (trained by `mm train --recipe tiny`): what `mm.load()` returns."""
    return shipped("tiny")


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def example(name: str) -> Path:
    """A bundled example input: `scene.png` (a held-out scene), `question.wav` (a spoken question about it)."""
    path = EXAMPLES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled example {name!r} in {EXAMPLES_DIR}")
    return path
