"""`mm generate` from the installed console script on a checkpoint made here (transformers + our tokenizer trainer)."""
import shutil
import subprocess
import sys

import torch

from decoders import LlamaForCausalLM
from decoders.tokenizer_train import train_sentencepiece
from tests.decoders.hf_llama import make_hf_llama

TEXT = "a red circle is left of a blue square. a green triangle is above a small yellow star.\n" * 20


def make_checkpoint(path):
    corpus = path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = train_sentencepiece([corpus], path / "tok", vocab_size=300)
    make_hf_llama(path / "model", vocab_size=300, num_key_value_heads=2)
    shutil.copy(path / "tok" / "tokenizer.model", path / "model" / "tokenizer.model")
    return path / "model", tok


def mm_command():
    exe = shutil.which("mm")
    return [exe] if exe else [sys.executable, "-m", "mm.apps.cli"]


def test_mm_generate_streams_the_greedy_continuation(tmp_path):
    model_dir, tok = make_checkpoint(tmp_path)
    prompt = "a red circle"
    out = subprocess.run(mm_command() + ["generate", "--model", str(model_dir), "--prompt", prompt,
                                         "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # expected: the greedy tokens of our model, cut at the first stop id, decoded once as a whole
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = tok.encode(prompt, bos=True)
    new = model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=None)[0, len(ids):].tolist()
    n_new = next((i + 1 for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    shown = [t for t in new[:n_new] if t not in tok.stop_ids]
    text = tok.decode(ids + shown)[len(tok.decode(ids)):]  # the continuation, its leading space included
    body, summary = out.stdout.rsplit("\n[", 1)
    assert body == prompt + text
    assert summary.startswith(f"prompt tokens: {len(ids)}, new tokens: {n_new}, ")
    assert "tokens/s]" in summary


def test_mm_generate_runs_a_mixture_of_experts_checkpoint(tmp_path):
    """A Hugging Face deepseek_v3 directory (MLA + MoE) goes through the same command; greedy text = generate()."""
    from decoders import DeepseekConfig, DeepseekForCausalLM
    from mm.train.text import init_weights

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = train_sentencepiece([corpus], tmp_path / "tok", vocab_size=300)
    cfg = DeepseekConfig.from_hf(dict(model_type="deepseek_v3", vocab_size=300, hidden_size=64, intermediate_size=96,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                      v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                      first_k_dense_replace=1, max_position_embeddings=128))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    init_weights(model, std=0.2)  # sharp logits: no near-ties between the two runs
    model.save_pretrained(tmp_path / "model")
    shutil.copy(tmp_path / "tok" / "tokenizer.model", tmp_path / "model" / "tokenizer.model")
    prompt = "a green triangle"
    out = subprocess.run(mm_command() + ["generate", "--model", str(tmp_path / "model"), "--prompt", prompt,
                                         "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ids = tok.encode(prompt, bos=True)
    new = DeepseekForCausalLM.from_pretrained(tmp_path / "model").generate(
        torch.tensor([ids]), max_new_tokens=8, eos_token_id=None)[0, len(ids):].tolist()
    n_new = next((i + 1 for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    shown = [t for t in new[:n_new] if t not in tok.stop_ids]
    assert out.stdout.rsplit("\n[", 1)[0] == prompt + tok.decode(ids + shown)[len(tok.decode(ids)):]


def test_mm_generate_reports_bad_input_clearly(tmp_path):
    model_dir, _ = make_checkpoint(tmp_path)
    out = subprocess.run(mm_command() + ["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "not a model directory" in out.stderr and "Traceback" not in out.stderr
    long_prompt = "a red circle " * 200  # far beyond the 256-token window of the test model
    out = subprocess.run(mm_command() + ["generate", "--model", str(model_dir), "--prompt", long_prompt],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "context window of 256" in out.stderr and "Traceback" not in out.stderr


def test_mm_generate_refuses_nonsense_options(tmp_path, capsys):
    import pytest

    from mm.apps.cli import main

    model_dir, _ = make_checkpoint(tmp_path)
    cases = [(["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 0, got -5"),
             (["--temperature", "-1"], "temperature must be a finite number >= 0 (0: greedy), got -1.0"),
             (["--temperature", "nan"], "temperature must be a finite number >= 0 (0: greedy), got nan"),
             (["--top-p", "5"], "top_p must lie in (0, 1] (or None), got 5.0"),
             (["--top-k", "-3"], "top_k must be an integer >= 0 (0 or None: no top-k), got -3")]
    for options, message in cases:
        assert main(["generate", "--model", str(model_dir), "--prompt", "a red", *options]) == 2
        assert f"mm generate: error: {message}" in capsys.readouterr().err
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got '5'"):
        model.generate(torch.tensor([[1, 5]]), max_new_tokens="5")


def test_mm_generate_reads_a_directory_with_only_tokenizer_json(tmp_path, capsys):
    """The same model and vocabulary, once with tokenizer.model and once with only the tokenizer.json transformers
    converts it to: the same continuation."""
    import json

    import transformers

    from mm.apps.cli import main

    model_dir, _ = make_checkpoint(tmp_path)
    json_dir = tmp_path / "json_only"
    shutil.copytree(model_dir, json_dir)
    (json_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                "bos_token": "<s>", "eos_token": "</s>"}))
    transformers.AutoTokenizer.from_pretrained(json_dir).save_pretrained(json_dir)
    (json_dir / "tokenizer.model").unlink()
    outs = []
    for d in (model_dir, json_dir):
        assert main(["generate", "--model", str(d), "--prompt", "a red circle", "--max-new-tokens", "8"]) == 0
        outs.append(capsys.readouterr().out.rsplit("\n[", 1)[0])
    assert outs[0] == outs[1] and len(outs[0]) > len("a red circle")
