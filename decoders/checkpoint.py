"""Safe checkpoint file IO and strict state-dict checks shared by every loader.

Nothing here unpickles untrusted code: safetensors files are read with `safetensors`, `.pth`/`.bin`
files with `torch.load(weights_only=True)`. Errors name the file, the key and the shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be loaded; the message says which file and which keys."""


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of one `.safetensors` file onto the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def read_torch(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.bin`/`.pt` state dict with `torch.load(weights_only=True)` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"{path}: not a loadable weights-only torch checkpoint: {e}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # common training-checkpoint wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object (a config, an index) from a file, naming the file in any error."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_config(model_dir: str | os.PathLike, parse):
    """`parse(config.json's dict)` for a model directory; a missing directory, and a ValueError from `parse`, become a
    CheckpointError naming the path."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a model directory")
    d = read_json(model_dir / "config.json")
    try:
        return parse(d)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from e


def check_config_keys(cls, d: dict) -> None:
    """Raise ValueError naming the keys of `d` that the config dataclass `cls` lacks (a typo, or another format)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")


def check_state_dict(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped tensors (if any)."""
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    wrong = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(state_dict[k].shape)}" for k in expected
                   if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k]))
    problems = [f"{what} {len(keys)}: " + sep.join(keys) for what, keys, sep in
                (("missing", missing, ", "), ("unexpected", unexpected, ", "), ("wrong shape", wrong, "; ")) if keys]
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the model: " + " | ".join(problems))


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           assign: bool = False) -> nn.Module:
    """Check names and shapes first, then load into `module`; nothing is half-loaded.

    With `assign=False` tensors are copied into the module's own (keeping its dtype); with `assign=True` the
    module takes the given tensors (use it for modules built on the meta device).
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source)
    not_finite = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise CheckpointError(f"{source}: tensors holding NaN or infinity: {', '.join(not_finite)}")
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


def build_from_state_dict(make, state_dict: dict[str, torch.Tensor], source: str, dtype: torch.dtype,
                          device: torch.device | str) -> nn.Module:
    """`make()` built on the meta device, taking `state_dict`'s tensors (cast to dtype, on device): no random init.

    Buffers outside the state dict (computed in `__init__`, e.g. RoPE frequencies) are moved to `device`.
    """
    with torch.device("meta"):
        module = make()
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    load_state_dict_strict(module, state_dict, source, assign=True)
    return module.to(device).eval()


def read_hf_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Hugging Face directory's weights: `model.safetensors`, a sharded index, or `pytorch_model.bin`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' dict")
        state_dict = {}
        root = model_dir.resolve()
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (model_dir / shard).resolve().is_relative_to(root):  # "../../etc/passwd" and absolute paths
                raise CheckpointError(f"{index}: shard {shard!r} lies outside the model directory")
            state_dict.update(read_safetensors(model_dir / shard))
        listed_missing = sorted(k for k in weight_map if k not in state_dict)
        if listed_missing:
            raise CheckpointError(f"{index}: tensors listed but absent from their shards: {', '.join(listed_missing)}")
        return state_dict
    for name in ("pytorch_model.bin", "model.pth"):
        if (model_dir / name).is_file():
            return read_torch(model_dir / name)
    raise CheckpointError(f"{model_dir}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin)")


def write_hf_weights(model_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when over `max_shard_bytes`."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards, current, size = [], {}, 0
    for k, v in state_dict.items():
        if current and size + v.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.nbytes
    shards.append(current)
    for stale in [model_dir / "model.safetensors", model_dir / "model.safetensors.index.json", *model_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(model_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
