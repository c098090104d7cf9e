"""Weight quantization of any tree of `nn.Linear` modules: `quantize_model` (RTN, AWQ, SmoothQuant) and the
resident-bytes report. The quantized linear modules and the RTN formulas live in `decoders.qlinear`; AWQ in
`decoders.awq`, SmoothQuant in `decoders.smoothquant`, checkpoints in `decoders.awq_format` and `decoders.gguf`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .awq import awq_quantize
from .qlinear import (BITS, GROUP_SIZES, METHODS, Int4Linear, Int8Linear, QuantLinear, W4A8Linear, W8A8Linear,
                      check_spec, dequantize_weight, fake_quantize, linear_names, quantize_weight, quantized_linear,
                      replace_module)
from .smoothquant import smoothquant_quantize

__all__ = ["BITS", "GROUP_SIZES", "METHODS", "Int4Linear", "Int8Linear", "QuantLinear", "W4A8Linear", "W8A8Linear",
           "check_spec", "dequantize_weight", "fake_quantize", "linear_names", "memory_report", "quantize_model",
           "quantize_weight", "quantized_linear", "replace_module"]

@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = 128,
                   symmetric: bool = False, include: Callable[[str], bool] | None = None, skip: Iterable[str] = (),
                   calib: torch.Tensor | None = None, progress: Callable[[str], None] | None = None,
                   activations: bool = False, **kwargs) -> nn.Module:
    """Replace the model's linears (those `include` accepts, minus `skip`) by quantized ones, in place; returns it.

    rtn: round to nearest (with `activations`: W8A8 without smoothing, or W4A8 / W3A8). awq: activation-aware
    scales + clip search (needs `calib` token ids [B, T]; with `activations`: those weights as W4A8 / W3A8).
    smoothquant: smoothing folded into the norms, then W8A8 (needs `calib`). `progress(name)` after each linear.
    """
    check_spec(bits, group_size, method)
    if activations and not (method == "rtn" or method == "awq" and bits < 8):
        raise ValueError(f"activations=True is RTN's W8A8, or W4A8/W3A8 of RTN or AWQ weights; got {method!r} with "
                         f"{bits} bits (SmoothQuant is W8A8 by itself)")
    if method != "rtn" and calib is None:
        raise ValueError(f"{method} needs calibration token ids (calib [batch, tokens])")
    if method == "awq":
        return awq_quantize(model, calib, bits, group_size, symmetric, include, skip, progress,
                            activations=activations, **kwargs)
    if method == "smoothquant":
        return smoothquant_quantize(model, calib, include=include, skip=skip, progress=progress, **kwargs)
    for name in linear_names(model, include, skip):
        try:
            new = quantized_linear(model.get_submodule(name), bits, group_size, symmetric, activations)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (keep it in float with skip=({name!r},), mm quantize --skip {name})") from e
        replace_module(model, name, new)
        if progress is not None:
            progress(name)
    return model


def int8_activations(model: nn.Module) -> nn.Module:
    """The model's 4/3-bit linears (Int4Linear: RTN, AWQ, a GGUF Q4_0 file) as W4A8Linear, the same weights times
    int8 activations; in place, returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Int4Linear):
            replace_module(model, name, W4A8Linear.from_int4(m))
    return model


def memory_report(model: nn.Module) -> dict:
    """Resident bytes of the quantized linears against the formula bits x params / 8 + scales (+ offsets).

    Memory holds 8 bits per weight for int8 and 4 for 4- and 3-bit codes (3-bit codes run on the 4-bit kernel); the
    formula adds 2 bytes per 16-bit scale and offset (4 per fp32 W8A8 scale); `float_bytes`: the same
    weights in bf16."""
    measured = formula = params = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            N, K = m.out_features, m.in_features
            if isinstance(m, (Int4Linear, W4A8Linear)):  # 4-bit codes, a 16-bit scale and offset per group
                formula += 4 * N * K // 8 + 2 * 2 * N * (K // m.group_size)
            else:  # int8 codes, one scale per output channel (bf16 weight-only, fp32 for W8A8)
                formula += N * K + N * m.scales.element_size()
            measured += m.weight_bytes()
            params += N * K
    return {"quantized_params": params, "measured_bytes": measured, "formula_bytes": formula,
            "float_bytes": 2 * params, "bits_per_weight": 8 * measured / max(params, 1)}
