"""The AutoAWQ GEMM layout: packing checked against a reference packer written here from AutoAWQ's
`WQLinear_GEMM.from_linear` (column loop, order_map 0,2,4,6,1,3,5,7); an AWQ checkpoint packed by it loads to the
logits of transformers' float Llama holding w = (q - z) * s; our quantized models round-trip through the directory."""
import json

import pytest
import torch

from decoders import CheckpointError
from decoders.awq_format import load_quantized, pack, save_quantized, unpack
from decoders.quantize import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear, quantize_model

from tests.decoders.hf_llama import make_hf_llama
from tests.decoders.test_quantize import tiny_llama


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop: intweight [K, N] -> int32 [K, N/8]; nibble i of column col = intweight[:, col*8 + order[i]]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].long() << (i * 4)
    return out.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else out.to(torch.int32)


def test_packing_order_matches_autoawq():
    codes = torch.randint(0, 16, (40, 64), generator=torch.Generator().manual_seed(0))
    expected = autoawq_pack(codes)
    assert torch.equal(pack(codes), expected)
    assert torch.equal(unpack(expected), codes)
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 1] = 0xF  # output 1 sits in nibble 4 (bits 16-19)
    assert int(pack(one)[0, 0]) == 0xF << 16


def autoawq_checkpoint(hf_model, path, g=32):
    """Quantize transformers' Llama as AutoAWQ stores it (asymmetric RTN), save it; return the dequantized model."""
    sd, deq = {}, {}
    for name, w in hf_model.state_dict().items():
        if name.endswith("proj.weight"):
            N, K = w.shape
            wg = w.view(N, K // g, g)
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = ((hi - lo) / 15).half().float()
            z = torch.round(-lo / s).clamp(0, 15)
            q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, 15)
            base = name.removesuffix(".weight")
            sd[f"{base}.qweight"] = autoawq_pack(q.reshape(N, K).t().int())
            sd[f"{base}.qzeros"] = autoawq_pack(z.t().int())
            sd[f"{base}.scales"] = s.t().half().contiguous()
            deq[name] = ((q - z[..., None]) * s[..., None]).reshape(N, K)
        else:
            sd[name] = w
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": g,
                                  "zero_point": True}
    (path / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        for name, w in deq.items():
            hf_model.get_parameter(name).copy_(w)
    return hf_model


def test_autoawq_checkpoint_loads_to_the_dequantized_logits(tmp_path):
    ref = autoawq_checkpoint(make_hf_llama(tmp_path, num_key_value_heads=2, vocab_size=96), tmp_path)
    model = load_quantized(tmp_path)
    assert isinstance(model.layers[1].self_attn.qkv_proj, Int4Linear)  # q, k, v stacked
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids)
    # bf16 activations and bf16 scales in the kernel: a few percent
    assert ((got - expected).norm() / expected.norm()).item() < 0.03


@pytest.mark.parametrize("method,bits,g,symmetric,kind", [("rtn", 4, 32, False, Int4Linear), ("rtn", 4, 64, True, Int4Linear),
                                                          ("rtn", 3, 32, False, Int4Linear), ("rtn", 3, 32, True, Int4Linear),
                                                          ("rtn", 8, None, True, Int8Linear),
                                                          ("smoothquant", 8, None, True, W8A8Linear),
                                                          ("rtn", 4, 32, False, W4A8Linear), ("awq", 3, 64, True, W4A8Linear)])
def test_quantized_models_round_trip(tmp_path, method, bits, g, symmetric, kind):
    model = quantize_model(tiny_llama(), method, bits, g, symmetric=symmetric, calib=torch.randint(0, 96, (2, 16)),
                           activations=kind is W4A8Linear)
    save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == {Int4Linear: "awq", Int8Linear: "mm-int8", W8A8Linear: "mm-w8a8",
                                   W4A8Linear: "awq"}[kind]
    assert cfg.get("mm_activations") == ("int8" if kind is W4A8Linear else None)
    back = load_quantized(tmp_path)
    assert isinstance(back.layers[0].mlp.gate_up_proj, kind)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_autoawq_checkpoint_with_int8_activations_holds_its_formula(tmp_path):
    autoawq_checkpoint(make_hf_llama(tmp_path, num_key_value_heads=2, vocab_size=96), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["mm_activations"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_quantized(tmp_path)
    lin = model.layers[0].mlp.down_proj
    assert isinstance(lin, W4A8Linear)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    q, z = unpack(sd["model.layers.0.mlp.down_proj.qweight"]).t(), unpack(sd["model.layers.0.mlp.down_proj.qzeros"]).t()
    s = sd["model.layers.0.mlp.down_proj.scales"].float().t()  # [N, G]
    want = ((q.view(*s.shape, -1) - z[..., None]) * s[..., None]).view_as(q)  # (q - z) s
    got = lin.dequantize()
    assert torch.equal(lin.scales, sd["model.layers.0.mlp.down_proj.scales"])  # fp16 scales kept as they are
    assert ((got - want).view(*s.shape, -1).abs() <= 15 * s[..., None] * 2**-11).all()  # z s rounded to fp16 once


def test_bad_quantized_checkpoints(tmp_path):
    model = quantize_model(tiny_llama(), "rtn", 4, 32)
    save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported"):
        load_quantized(tmp_path)
    cfg["quantization_config"].update(quant_method="awq", version="gemv")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version 'gemv'"):
        load_quantized(tmp_path)
    cfg["quantization_config"].update(version="gemm", group_size=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_quantized(tmp_path)
    cfg["quantization_config"].update(group_size=32, mm_activations="fp8")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mm_activations 'fp8'; supported: int8"):
        load_quantized(tmp_path)
