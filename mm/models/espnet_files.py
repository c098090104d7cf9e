"""Finding the files of an ESPnet/Dolphin experiment: config.yaml, the model *.pth, feats_stats.npz and the BPE
model, from a directory laid out as ESPnet writes it (exp/*/), a model-zoo meta.yaml, or a single config.yaml."""
from __future__ import annotations

import os
from pathlib import Path

from decoders.checkpoint import CheckpointError


MODEL_FILE_PREFERENCE = ("valid.acc.ave.pth", "valid.acc.best.pth", "valid.loss.ave.pth", "valid.loss.best.pth")


def _find_config(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "config.yaml").is_file():
        return path / "config.yaml"
    found = sorted(p for p in path.glob("exp/*/config.yaml")) or sorted(path.glob("*/config.yaml"))
    found = [p for p in found if _model_files(p.parent)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{path}: no ESPnet config.yaml (looked in the directory, exp/*/ and */)")
    raise CheckpointError(f"{path}: several experiments, pass one of: {', '.join(str(p.parent) for p in found)}")


def _model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())


def _resolve(rel, config: Path, root: Path) -> Path | None:
    """A path from config.yaml: as given if absolute, else relative to the config's directory or one above it
    (ESPnet writes them relative to the recipe directory), else the same file name next to the config."""
    if not rel:
        return None
    rel = Path(str(rel))
    if rel.is_absolute() and rel.is_file():
        return rel
    bases = [config.parent, *list(config.parent.parents)[:4], root]
    for base in bases:
        if not rel.is_absolute() and (base / rel).is_file():
            return base / rel
    for base in (config.parent, root):
        if (base / rel.name).is_file():
            return base / rel.name
    return None


def _meta_yaml_files(root: Path) -> tuple[Path | None, Path | None]:
    """Config and model named by an ESPnet model-zoo `meta.yaml` (yaml_files.asr_train_config, files.asr_model_file;
    s2t_* for OWSM/Dolphin-style S2T packs), relative to root; (None, None) without one."""
    import yaml

    meta = root / "meta.yaml"
    if not (root.is_dir() and meta.is_file()):
        return None, None
    try:
        m = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: not valid YAML: {e}") from e
    files, yaml_files = m.get("files") or {}, m.get("yaml_files") or {}
    config = yaml_files.get("asr_train_config") or yaml_files.get("s2t_train_config")
    model = files.get("asr_model_file") or files.get("s2t_model_file")
    for name, rel in (("config", config), ("model file", model)):
        if rel is not None and not (root / rel).is_file():
            raise CheckpointError(f"{meta}: the {name} it names, {rel}, does not exist")
    return (root / config if config else None), (root / model if model else None)


def find_espnet_files(path: str | os.PathLike, model_file: str | os.PathLike | None = None) -> dict:
    """Locate config.yaml, the model .pth, feats_stats.npz, the BPE model and the token list of an experiment.

    config.yaml and the model file: those named by a model-zoo `meta.yaml` in path if there is one; else
    path/config.yaml or exp/*/config.yaml, and `model_file` if given, else the only *.pth/*.pt next to config.yaml,
    else the first of valid.acc.ave.pth, valid.acc.best.pth, valid.loss.ave.pth, valid.loss.best.pth.
    """
    import yaml

    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such directory")
    named_config, named_model = _meta_yaml_files(root)
    config = named_config or _find_config(root)
    model_file = model_file or named_model
    try:
        conf = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config}: not valid YAML: {e}") from e
    if not isinstance(conf, dict) or "token_list" not in conf or "encoder" not in conf:
        raise CheckpointError(f"{config}: not an ESPnet ASR config (needs token_list and encoder)")
    root = root if root.is_dir() else config.parent
    if model_file is None:
        candidates = _model_files(config.parent)
        preferred = [config.parent / n for n in MODEL_FILE_PREFERENCE if (config.parent / n).is_file()]
        if len(candidates) == 1:
            model_file = candidates[0]
        elif preferred:
            model_file = preferred[0]
        elif not candidates:
            raise CheckpointError(f"{config.parent}: no model file (*.pth / *.pt) next to config.yaml")
        else:
            raise CheckpointError(f"{config.parent}: several model files, pass model_file= one of "
                                  f"{', '.join(p.name for p in candidates)}")
    token_list = conf["token_list"]
    if isinstance(token_list, str):
        token_file = _resolve(token_list, config, root)
        if token_file is None:
            raise CheckpointError(f"{config}: token_list file {token_list!r} not found")
        token_list = [line.rstrip("\n") for line in token_file.read_text(encoding="utf-8").splitlines()]
    if not isinstance(token_list, list) or not token_list:
        raise CheckpointError(f"{config}: token_list must be a non-empty list or a file of tokens")
    stats = (conf.get("normalize_conf") or {}).get("stats_file")
    return {
        "config": config, "config_dict": conf, "model": Path(model_file), "token_list": [str(t) for t in token_list],
        "stats_file": _resolve(stats, config, root) or _resolve("feats_stats.npz", config, root),
        "bpemodel": _resolve(conf.get("bpemodel"), config, root) if conf.get("token_type", "bpe") == "bpe" else None,
    }


def is_espnet_dir(path: str | os.PathLike) -> bool:
    """True when path looks like an ESPnet experiment: a model-zoo meta.yaml, or config.yaml with a *.pth/*.pt beside
    it, here or in exp/*/."""
    path = Path(path)
    if not path.is_dir():
        return False
    meta = path / "meta.yaml"
    if meta.is_file() and any(k in meta.read_text(errors="replace") for k in ("asr_train_config", "s2t_train_config")):
        return True
    configs = [path / "config.yaml"] + sorted(path.glob("exp/*/config.yaml"))
    return any(c.is_file() and _model_files(c.parent) for c in configs)
