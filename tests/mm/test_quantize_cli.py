"""`mm quantize` writes a directory that mm.load and mm generate open (equal to quantizing in process), GGUF files
open with mm.load, and the shipped multimodal model's decoder + projector quantize in place."""
import copy
import json

import pytest
import torch

import mm
from decoders import LlamaForCausalLM
from decoders.gguf import save_gguf
from decoders.quantize import Int4Linear, Int8Linear, QuantLinear, W4A8Linear, W8A8Linear, quantize_model
from decoders.tokenizer import load_tokenizer
from mm.apps.cli import main
from mm.apps.quantize import calibration_ids, calibration_texts

from tests.mm.test_cli_generate import make_checkpoint

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir, _ = make_checkpoint(tmp_path_factory.mktemp("q"))
    return model_dir


@pytest.mark.parametrize("args,kind", [(["--method", "rtn", "--bits", "8"], Int8Linear),
                                       (["--method", "awq", "--bits", "4", "--group-size", "32", "--skip", "lm_head"],
                                        Int4Linear),
                                       (["--method", "smoothquant", "--bits", "8"], W8A8Linear),
                                       (["--method", "awq", "--bits", "4", "--group-size", "32", "--skip", "lm_head",
                                         "--int8-activations"], W4A8Linear),
                                       (["--method", "rtn", "--bits", "4", "--group-size", "32", "--skip", "lm_head",
                                         "--int8-activations"], W4A8Linear)])
def test_mm_quantize_writes_what_mm_load_and_generate_open(checkpoint, tmp_path, capsys, args, kind):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": t}) for t in ["a red circle left of a blue square"] * 3 +
                               ["a green triangle above a small yellow star"] * 3))
    out = tmp_path / "out"
    assert main(["quantize", str(checkpoint), *args, "--calib", str(calib), "--calib-samples", "2",
                 "--calib-tokens", "16", "--out", str(out)]) == 0
    assert "formula" in capsys.readouterr().out
    loaded = mm.load(out)
    skip = ("lm_head",) if "--skip" in args else ()  # vocabulary 300: not a multiple of 16 for the int4 kernel
    assert isinstance(loaded.layers[0].self_attn.qkv_proj, kind)
    assert isinstance(loaded.lm_head, torch.nn.Linear if skip else kind)
    # the same quantization in process, on the same calibration ids
    ref = mm.load(checkpoint)
    ids = calibration_ids(load_tokenizer(checkpoint), calibration_texts(str(calib), 8), 2, 16)
    method, bits = args[1], int(args[3])
    quantize_model(ref, method, bits, 32 if bits == 4 else None, calib=ids, skip=skip,
                   activations="--int8-activations" in args)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ref(IDS))
    assert main(["generate", "--model", str(out), "--prompt", "a red", "--max-new-tokens", "5"]) == 0
    assert "new tokens: 5" in capsys.readouterr().out


def test_mm_quantize_bad_options(checkpoint, tmp_path, capsys):
    assert main(["quantize", str(checkpoint), "--method", "smoothquant", "--bits", "4", "--out", str(tmp_path)]) == 2
    assert "smoothquant is W8A8" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--bits", "4", "--group-size", "48", "--out", str(tmp_path)]) == 2
    assert "group_size in" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--bits", "4", "--group-size", "32", "--out", str(tmp_path)]) == 2
    assert "lm_head: the int4 kernel needs out_features divisible by 16" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--method", "awq", "--calib", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--method", "awq", "--bits", "8", "--int8-activations",
                 "--out", str(tmp_path)]) == 2
    assert "W8A8 is --method smoothquant or rtn" in capsys.readouterr().err


def test_mm_load_opens_gguf(tmp_path):
    from tests.decoders.hf_llama import make_hf_llama

    make_hf_llama(tmp_path, num_key_value_heads=2)
    save_gguf(LlamaForCausalLM.from_pretrained(tmp_path), tmp_path / "m.gguf", "Q4_0")
    model = mm.load(tmp_path / "m.gguf")
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert mm.models.formats.detect(tmp_path / "m.gguf") == "gguf"


@pytest.mark.parametrize("bits,g,tol", [(8, None, 0.03), (4, 32, 0.15)])
def test_multimodal_decoder_and_projector_quantize(bits, g, tol):
    model = mm.load()
    ref = copy.deepcopy(model)
    quantize_model(model, "rtn", bits, g, include=lambda n: n.startswith(("language_model.", "projector.")))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {"projector.linear_1", "projector.linear_2", "language_model.lm_head"} <= quantized
    assert all(n.startswith(("language_model.", "projector.")) for n in quantized)
    assert not any(isinstance(m, QuantLinear) for m in model.vision_tower.modules())
    features = torch.randn(3, ref.projector.linear_1.in_features)
    ids = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in ((model.projector(features), ref.projector(features)),
                     (model.language_model(ids), ref.language_model(ids))):
            assert ((a - b).norm() / b.norm()).item() < tol
