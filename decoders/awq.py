"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware weight quantization.

Per group of linears that read one input X [n, K] (e.g. q/k/v after the attention norm):
  1. scale search: x_mean = mean |X| per input channel; for alpha in {0, 0.05, ..., 0.95}: s = x_mean^alpha,
     normalised by sqrt(max s * min s); pick the s minimising || X W^T - X (Q(W diag(s)) diag(s)^-1)^T ||^2, where Q
     is group-wise RTN; fold: W <- W diag(s), the preceding op's output <- output / s (RMSNorm weight, or the rows of
     the preceding linear: v rows for o_proj, up rows for down_proj), so the float model is unchanged;
  2. clip search: per output channel and group, shrink the range to r * max|w| for r in {1, 0.975, ..., 0.5},
     keeping the r minimising the group's output error on X (skipped for q/k, whose errors the softmax amplifies);
  3. group-wise RTN of the scaled, clipped weights (decoders.quantize).

Calibration activations come from one float forward pass (folding leaves the float outputs unchanged, so the
inputs of later layers are the same as AutoAWQ's layer-by-layer pass). The pairs (preceding op -> linears) are
found in any tree of `nn.Linear` modules: a norm whose output tensor is a linear's input (seen in the forward
pass), and the SwiGLU / attention pairs by name (`gate_up_proj`/`up_proj` -> `down_proj`,
`qkv_proj`/`v_proj` -> `o_proj` when the widths match, i.e. no grouped-query sharing). Linears with no preceding op
get the clip search only. The errors are those of the linears' outputs (AutoAWQ measures whole attention/MLP
modules there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .qlinear import check_spec, fake_quantize, linear_names, quantized_linear, replace_module

GRID = [i / 20 for i in range(20)]  # alpha in {0, 0.05, ..., 0.95}
CLIP_GRID = [1 - i / 40 for i in range(21)]  # r in {1, 0.975, ..., 0.5}


@dataclass
class ScaleGroup:
    """Linears that read one input, and the op whose output that input is (a norm, or rows of a linear)."""

    prev: str | None  # module name of the norm or linear before; None: nothing to fold into
    linears: list[str]
    rows: slice | None = None  # the preceding linear's output rows that are the input (None for norms)


def is_norm(m: nn.Module) -> bool:
    """A norm ending in a per-channel weight (RMSNorm, LayerNorm): its output can absorb 1/s."""
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("Norm") and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def collect_inputs(model: nn.Module, calib: torch.Tensor, names: list[str], max_rows: int = 512):
    """Run the float model on calib ids [B, T]; per linear: mean |x| [K] over all tokens, max |x| [K], up to
    `max_rows` input rows X [n, K] (float32, evenly spread over the calibration tokens), and the norm feeding it."""
    stats = {n: {"sum": 0.0, "count": 0, "max": 0.0, "rows": []} for n in names}
    norm_out: dict[int, str] = {}
    fed_by: dict[str, str] = {}
    keep = []  # norm outputs stay alive during a pass, so their ids are not reused
    stride = max(1, calib.numel() // max_rows)
    hooks = []
    def seen(mod, inp, out, name):
        norm_out[id(out)] = name
        keep.append(out)

    for name, m in model.named_modules():
        if is_norm(m):
            hooks.append(m.register_forward_hook(lambda mod, i, out, name=name: seen(mod, i, out, name)))
    for name in names:
        def pre(mod, inp, name=name):
            x = inp[0]
            if id(x) in norm_out:
                fed_by.setdefault(name, norm_out[id(x)])
            x = x.detach().reshape(-1, x.shape[-1]).float()
            s = stats[name]
            s["sum"] = s["sum"] + x.abs().sum(0)
            s["count"] += x.shape[0]
            s["max"] = torch.maximum(torch.as_tensor(s["max"]), x.abs().amax(0))
            s["rows"].append(x[::stride])
        hooks.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        for row in calib:
            model(row[None])
            norm_out.clear()
            keep.clear()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, s in stats.items():
        if s["count"]:
            rows = torch.cat(s["rows"])[:max_rows]
            out[n] = {"mean": s["sum"] / s["count"], "max": s["max"], "rows": rows}
    return out, fed_by


def scale_groups(model: nn.Module, names: list[str], fed_by: dict[str, str]) -> list[ScaleGroup]:
    """The (preceding op -> linears) pairs of the model, in module order, then the linears with none."""
    groups: dict[str, ScaleGroup] = {}
    for n in names:
        if n in fed_by:
            groups.setdefault(fed_by[n], ScaleGroup(fed_by[n], [])).linears.append(n)
    taken = {n for g in groups.values() for n in g.linears}
    modules = dict(model.named_modules())
    for n in names:
        parent, _, leaf = n.rpartition(".")
        pre = f"{parent}." if parent else ""
        target = modules[n]
        # the input is the last of `blocks` equal row blocks of the preceding linear: up of gate/up, v of fused q, k, v
        # of equal widths (MHA; with grouped-query sharing v is narrower than o_proj's input: no fold), or all of it
        for prev_leaf, leaf_name, blocks in (("gate_up_proj", "down_proj", 2), ("up_proj", "down_proj", 1),
                                             ("qkv_proj", "o_proj", 3), ("v_proj", "o_proj", 1)):
            prev = modules.get(pre + prev_leaf)
            if leaf != leaf_name or n in taken or not isinstance(prev, nn.Linear):
                continue
            k = target.in_features
            if prev.out_features == blocks * k:
                groups[n] = ScaleGroup(pre + prev_leaf, [n], slice((blocks - 1) * k, blocks * k))
                taken.add(n)
    rest = [ScaleGroup(None, [n]) for n in names if n not in taken]
    return list(groups.values()) + rest


def group_weight(model, group: ScaleGroup) -> torch.Tensor:
    return torch.cat([model.get_submodule(n).weight.detach().float() for n in group.linears])  # [sum N, K]


@torch.no_grad()
def search_scale(X: torch.Tensor, x_mean: torch.Tensor, W: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool) -> tuple[torch.Tensor, float, float]:
    """The AWQ scale s [K] over the alpha grid; also the output errors of s and of plain RTN (alpha 0)."""
    Y = X @ W.t()
    best, best_err, rtn_err = None, float("inf"), None
    for alpha in GRID:
        s = x_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Wq = fake_quantize(W * s, bits, group_size, symmetric) / s
        err = (X @ Wq.t() - Y).pow(2).mean().item()
        if rtn_err is None:
            rtn_err = err
        if err < best_err:
            best, best_err = s, err
    return best, best_err, rtn_err


@torch.no_grad()
def search_clip(X: torch.Tensor, W: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                chunk: int = 256) -> torch.Tensor:
    """Per output channel and group, the clipped max |w| [N, G] minimising the group's output error on X."""
    if W.shape[0] > chunk:  # [n, N, G] partial outputs: a few output channels at a time
        return torch.cat([search_clip(X, w, bits, group_size, symmetric, chunk) for w in W.split(chunk)])
    N, K = W.shape
    G = K // group_size
    Xg = X.view(-1, G, group_size)  # [n, G, g]
    Wg = W.view(N, G, group_size)
    org_max = Wg.abs().amax(-1)  # [N, G]
    Y = torch.einsum("ngk,ogk->nog", Xg, Wg)  # [n, N, G] per-group partial outputs
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for r in CLIP_GRID:
        m = (org_max * r)[..., None]
        Wc = torch.maximum(torch.minimum(Wg, m), -m).reshape(N, K)
        Wq = fake_quantize(Wc, bits, group_size, symmetric).view(N, G, group_size)
        err = (torch.einsum("ngk,ogk->nog", Xg, Wq) - Y).pow(2).mean(0)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, org_max * r, best_max)
    return best_max


@torch.no_grad()
def fold_scale(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """W <- W diag(s) for the group's linears, the preceding op's output <- output / s: the float model is unchanged."""
    for n in group.linears:
        w = model.get_submodule(n).weight
        w.copy_((w.float() * s).to(w.dtype))
    prev = model.get_submodule(group.prev)
    if group.rows is None:  # a norm: weight (and bias) / s
        prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    else:
        rows = prev.weight[group.rows]
        prev.weight[group.rows] = (rows.float() / s[:, None]).to(rows.dtype)
        if prev.bias is not None:
            prev.bias[group.rows] = (prev.bias[group.rows].float() / s).to(prev.bias.dtype)


def skips_clip(name: str) -> bool:
    return name.rpartition(".")[2] in ("q_proj", "k_proj", "qkv_proj")


@torch.no_grad()
def awq_quantize(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                 include: Callable[[str], bool] | None = None, skip: Iterable[str] = (),
                 progress: Callable[[str], None] | None = None, max_rows: int = 512, report: dict | None = None,
                 activations: bool = False):
    """AWQ in place on the model's linears (see the module docstring); returns the model. `report`, if given,
    receives per group the output errors {linears: (awq, rtn)} measured on the calibration rows. `activations`: the
    weights run as W4A8 / W3A8 (int8 activations at run time; the search itself sees float activations)."""
    check_spec(bits, group_size, "awq")
    if bits == 8:
        raise ValueError("AWQ is a low-bit weight method (bits 4 or 3)")
    names = linear_names(model, include, skip)
    stats, fed_by = collect_inputs(model, calib, names, max_rows)
    groups = [g for g in scale_groups(model, names, fed_by) if g.linears[0] in stats]  # reached by the calibration
    scales = {}
    for group in groups:  # 1. all scales folded first: a fold into a linear's rows must precede its quantization
        if group.prev is not None:
            W = group_weight(model, group)
            s, err, rtn_err = search_scale(stats[group.linears[0]]["rows"], stats[group.linears[0]]["mean"], W, bits,
                                           group_size, symmetric)
            if report is not None:
                report[", ".join(group.linears)] = (err, rtn_err)
            fold_scale(model, group, s)
            scales.update({n: s for n in group.linears})
    for n in names:  # 2. clip search on the inputs after the fold, 3. group-wise RTN
        lin = model.get_submodule(n)
        w = lin.weight.detach().float()
        if n in stats and not skips_clip(n):
            X = stats[n]["rows"] / scales[n] if n in scales else stats[n]["rows"]
            m = search_clip(X, w, bits, group_size, symmetric)[..., None]
            wg = w.view(w.shape[0], -1, group_size)
            w = torch.maximum(torch.minimum(wg, m), -m).reshape(w.shape)
        try:
            replace_module(model, n, quantized_linear(lin, bits, group_size, symmetric, activations, weight=w))
        except ValueError as e:
            raise ValueError(f"{n}: {e} (keep it in float with skip=({n!r},), mm quantize --skip {n})") from e
        if progress is not None:
            progress(n)
    return model
