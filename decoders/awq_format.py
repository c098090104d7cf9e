"""Quantized Llama directories: the AutoAWQ / Hugging Face "GEMM" layout for 4- and 3-bit weights, int8 for 8-bit.

    AWQ GEMM (per linear, K inputs, N outputs, groups of g inputs), as AutoAWQ's `WQLinear_GEMM.from_linear` packs:
        qweight  int32 [K, N/8]    8 codes per int32 along the outputs; nibble i (bits 4i..4i+3) of column c holds
                                   output c*8 + ORDER[i], ORDER = 0, 2, 4, 6, 1, 3, 5, 7
        qzeros   int32 [K/g, N/8]  the zero points z, packed the same way
        scales   fp16  [K/g, N]
        w[n, k] = (q[k, n] - z[k/g, n]) * s[k/g, n]
    config.json `quantization_config`: {"quant_method": "awq", "version": "gemm", "bits", "group_size", "zero_point"}
    (engines that read AWQ take bits 4; 3-bit codes are written in the same nibbles with bits 3).
    int8 (mm's own): `qweight` int8 [N, K], `scales` [N]; quant_method "mm-int8" (weight-only) or "mm-w8a8".
    W4A8 / W3A8 (4/3-bit weights times int8 activations): the AWQ tensors with "mm_activations": "int8" added to the
    AWQ config (engines that read AWQ serve the same weights weight-only).

Hugging Face keys (q_proj, k_proj, v_proj, gate_proj, up_proj separate) hold the quantized tensors; our fused
q/k/v and gate/up stack their rows. Symmetric codes are written with z = 8.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import w4a8
from .checkpoint import CheckpointError, load_state_dict_strict, read_hf_weights, read_json, write_hf_weights
from .convert_hf import convert_hf_state_dict, to_hf_state_dict
from .llama import LlamaConfig, LlamaForCausalLM
from .qlinear import Int4Linear, Int8Linear, QuantLinear, W4A8Linear, W8A8Linear, replace_module

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, C] (0..15) -> int32 [R, C/8] in AWQ's order."""
    R, C = codes.shape
    c = codes.to(torch.int64).reshape(R, C // 8, 8)[:, :, ORDER]
    packed = sum(c[:, :, i] << (4 * i) for i in range(8))
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # two's complement: the top nibble may set the sign bit


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ's order -> codes [R, C]."""
    R, C8 = packed.shape
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [R, C/8, 8]: nibble i
    codes = torch.empty_like(nibbles)
    codes[:, :, ORDER] = nibbles  # nibble i is output ORDER[i]
    return codes.reshape(R, C8 * 8)


def awq_tensors(u: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Codes u [N, K], scales s [G, N] (fp16), zero points z [G, N] (w = (u - z) s) as AWQ's qweight [K, N/8], qzeros
    [K/g, N/8] (int32), scales [K/g, N]. Symmetric 3-bit codes (u - 8 in [-4, 3], z = 8) move to z = 4."""
    if bits < 4 and bool((z == 8).all()):
        u, z = u - 4, z - 4
    return {"qweight": pack(u.t().contiguous()), "qzeros": pack(z.contiguous()), "scales": s.contiguous()}


def int4_to_awq(lin: Int4Linear) -> dict[str, torch.Tensor]:
    """An Int4Linear's AWQ tensors (its bf16 scales in fp16; z = 8 - o / s up to the offset's bf16 rounding)."""
    s, o = lin.scales_offsets()  # [N, G] each
    z = 8 - torch.round(o / s)  # o = (8 - z) s, up to the offset's bfloat16 rounding
    return awq_tensors(w4a8.unpack(lin.qweight), s.t().half(), z.t(), lin.bits)  # its codes as they are


def w4a8_to_awq(lin: W4A8Linear) -> dict[str, torch.Tensor]:
    """A W4A8Linear's AWQ tensors: its codes, its fp16 scales as they are, zero points z = -c / s (c = o - 8 s = -z s)."""
    s16, c16 = w4a8.unpack_scales(lin.sc)  # [K/g, N] each
    s, c = s16.float(), c16.float()
    z = torch.where(s > 0, torch.round(-c / s), 8).clamp(0, 15)  # s = 0 (an all-zero group): any z
    return awq_tensors(w4a8.unpack(lin.qweight), s16, z, lin.bits)


def awq_to_int4(qweight, qzeros, scales, bits: int, group_size: int, source: str) -> tuple:
    """AWQ tensors -> (u [N, K], scale [N, G], offset [N, G]) for Int4Linear: u = q, offset = (8 - z) s."""
    K, G = qweight.shape[0], scales.shape[0]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or K != G * group_size or \
            qzeros.shape != (G, qweight.shape[1]) or scales.shape[1] != 8 * qweight.shape[1]:
        raise CheckpointError(f"{source}: AWQ tensors qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros "
                              f"{tuple(qzeros.shape)} {qzeros.dtype}, scales {tuple(scales.shape)} do not fit "
                              f"[K, N/8] int32, [K/{group_size}, N/8] int32, [K/{group_size}, N]")
    q, z, s = unpack(qweight).t(), unpack(qzeros).t().float(), scales.float().t()  # [N, K], [N, G], [N, G]
    if int(q.max()) >= 2 ** bits:
        raise CheckpointError(f"{source}: codes up to {int(q.max())} in a {bits}-bit checkpoint")
    return q.contiguous(), s, (8 - z) * s


def save_quantized(model: LlamaForCausalLM, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a quantized Llama (quantize_model's output) as a Hugging Face directory (see the module docstring)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kinds = {type(m) for m in model.modules() if isinstance(m, QuantLinear)}
    if len(kinds) != 1:
        raise ValueError(f"save_quantized needs one kind of quantized linear, found {sorted(k.__name__ for k in kinds)}")
    cfg = model.config
    H, Hkv, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    sizes = {"qkv_proj": [H * D, Hkv * D, Hkv * D], "gate_up_proj": [I, I]}
    out, quant = {}, None
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if isinstance(m, (Int4Linear, W4A8Linear)):
            t = int4_to_awq(m) if isinstance(m, Int4Linear) else w4a8_to_awq(m)
            quant = {"quant_method": "awq", "version": "gemm", "bits": m.bits, "group_size": m.group_size,
                     "zero_point": True, **({"mm_activations": "int8"} if isinstance(m, W4A8Linear) else {})}
            split = lambda k, v, n: v.split(n if k == "scales" else [x // 8 for x in n], dim=1)  # noqa: E731
        else:
            t = {"qweight": m.qweight, "scales": m.scales}
            quant = {"quant_method": "mm-w8a8" if isinstance(m, W8A8Linear) else "mm-int8", "bits": 8}
            split = lambda k, v, n: v.split(n, dim=0)  # noqa: E731
        base, _, leaf = name.rpartition(".")
        prefix = f"model.{base}." if name != "lm_head" else ""
        if leaf in FUSED:
            for k, v in t.items():
                for part, piece in zip(FUSED[leaf], split(k, v, sizes[leaf])):
                    out[f"{prefix}{part}.{k}"] = piece.contiguous()
        else:
            out.update({f"{prefix}{leaf}.{k}": v for k, v in t.items()})
    float_sd = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(n + ".") for n, m in model.named_modules() if isinstance(m, QuantLinear))}
    out.update(to_hf_state_dict(float_sd, cfg))
    hf = cfg.to_hf()
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    hf["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_hf_weights(path, out, max_shard_bytes)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> LlamaForCausalLM:
    """Open a quantized Llama directory (AWQ GEMM, + int8 activations, mm-int8, mm-w8a8) with its linears quantized
    in memory."""
    path = Path(path)
    d = read_json(path / "config.json")
    q = d.get("quantization_config") or {}
    method = q.get("quant_method")
    if method not in ("awq", "mm-int8", "mm-w8a8"):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config quant_method {method!r} is not supported "
                              "(supported: awq, mm-int8, mm-w8a8)")
    if method == "awq" and (q.get("version", "gemm").lower() != "gemm" or q.get("bits", 4) not in (3, 4)):
        raise CheckpointError(f"{path / 'config.json'}: AWQ version {q.get('version')!r} bits {q.get('bits')!r}; "
                              "supported: version gemm, bits 4 (or 3)")
    if q.get("mm_activations", "int8") != "int8":
        raise CheckpointError(f"{path / 'config.json'}: mm_activations {q['mm_activations']!r}; supported: int8")
    try:
        cfg = LlamaConfig.from_hf(d)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    sd = read_hf_weights(path)
    qkeys = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".qweight")})  # HF module names
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    groups: dict[str, list[str]] = {}
    for hf_name in qkeys:
        ours = hf_name.removeprefix("model.")
        base, _, leaf = ours.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if leaf in parts), None)
        groups.setdefault(f"{base}.{fused}" if fused else ours, []).append(hf_name)
    for ours, hf_names in groups.items():
        leaf = ours.rpartition(".")[2]
        if leaf in FUSED:  # rows stacked in q, k, v / gate, up order
            order = {p: i for i, p in enumerate(FUSED[leaf])}
            hf_names = sorted(hf_names, key=lambda n: order[n.rpartition(".")[2]])
            if len(hf_names) != len(FUSED[leaf]):
                raise CheckpointError(f"{path}: {ours} needs quantized {', '.join(FUSED[leaf])}; found {hf_names}")
        take = lambda k: [sd.pop(f"{n}.{k}") for n in hf_names]  # noqa: E731
        try:
            if method == "awq":
                parts = [awq_to_int4(a, b, c, q.get("bits", 4), q["group_size"], f"{path}: {n}")
                         for a, b, c, n in zip(take("qweight"), take("qzeros"), take("scales"), hf_names)]
                u, s, o = (torch.cat([p[j] for p in parts]) for j in range(3))
                new: nn.Module = (W4A8Linear if "mm_activations" in q else Int4Linear)(u, s, o, q.get("bits", 4),
                                                                                      q["group_size"])
            else:
                w, s = torch.cat(take("qweight")), torch.cat(take("scales"))
                new = (W8A8Linear if method == "mm-w8a8" else Int8Linear)(w, s)
        except KeyError as e:
            raise CheckpointError(f"{path}: {ours}: missing tensor {e}") from e
        replace_module(model, ours, new)
    rest = convert_hf_state_dict(sd, cfg, source=str(path))
    rest = {k: v.to(dtype) for k, v in rest.items()}
    qstate = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    load_state_dict_strict(model, {**rest, **qstate}, str(path), assign=True)
    return model.to(device).eval()
