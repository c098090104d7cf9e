"""SmoothQuant (Xiao et al., 2023, arXiv 2211.10438): migrate activation outliers into the weights, then W8A8.

Per group of linears that read one norm's output X (q/k/v after the attention norm, gate/up after the MLP norm):
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (max over calibration tokens; over the group's output rows)
    norm weight <- weight / s,  W <- W diag(s)          (the float model is unchanged)
then every linear becomes a `W8A8Linear`: int8 weights per output channel, int8 activations per token with a
dynamic scale max|x| / 127, int32 accumulation (`torch._int_mm`). alpha 0.5 by default; the paper uses 0.85 for
Llama. Linears with no norm before them (o_proj, down_proj) are quantized as they are, as in the paper.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .awq import ScaleGroup, collect_inputs, fold_scale, group_weight, scale_groups
from .qlinear import linear_names, quantized_linear, replace_module


def smoothing_scale(x_max: torch.Tensor, W: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = max|X|^alpha / max|W|^(1 - alpha), per input channel (W [N, K] the group's stacked weights)."""
    w_max = W.abs().amax(0).clamp(min=1e-5)
    return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, calib: torch.Tensor, alpha: float = 0.5, include: Callable[[str], bool] | None = None,
           skip: Iterable[str] = ()) -> list[ScaleGroup]:
    """Fold the smoothing scales into the norms before the model's linears (float weights stay float); returns the
    groups smoothed."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    names = linear_names(model, include, skip)
    stats, fed_by = collect_inputs(model, calib, names, max_rows=1)
    groups = [g for g in scale_groups(model, names, fed_by) if g.prev is not None and g.rows is None]
    for g in groups:
        fold_scale(model, g, smoothing_scale(stats[g.linears[0]]["max"], group_weight(model, g), alpha))
    return groups


@torch.no_grad()
def smoothquant_quantize(model: nn.Module, calib: torch.Tensor, alpha: float = 0.5,
                         include: Callable[[str], bool] | None = None, skip: Iterable[str] = (),
                         progress: Callable[[str], None] | None = None) -> nn.Module:
    """Smooth, then replace every selected linear by a W8A8 one, in place; returns the model."""
    smooth(model, calib, alpha, include, skip)
    for n in linear_names(model, include, skip):
        replace_module(model, n, quantized_linear(model.get_submodule(n), 8, None, activations=True))
        if progress is not None:
            progress(n)
    return model
