"""llama.cpp itself reads what `save_gguf` writes: its greedy tokens (llama-simple) equal ours on the same weights,
F32 and BF16 (so the q/k permutation, the norms, GQA, the head and the placeholder vocabulary are all right), and
`mm.eval.llama_cpp` reads llama-bench's JSON. llama.cpp is built from the pinned llama-cpp-python sdist on first use."""
import pytest
import torch

from decoders import LlamaConfig, LlamaForCausalLM
from decoders.gguf import save_gguf
from decoders.qlinear import W4A8Linear, W8A8Linear
from mm.eval.llama_cpp import binaries, llama_bench, llama_greedy, ours_for

from tests.mm.wheels import llama_cpp_build


@pytest.fixture(scope="module")
def exes():
    return binaries(llama_cpp_build())


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         rope_theta=500.0, max_position_embeddings=256))
    with torch.no_grad():  # wide weights: attention and MLPs move the logits a lot, and the top two stay apart
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # norms away from 1: a missing one shows
    return model.eval()


def clear_prompts(model, count: int, new: int, margin: float) -> list[tuple[list[int], list[int]]]:
    """`count` random prompts (BOS + 0..8 ids) whose `new` greedy steps all have a top-1/top-2 logit gap over
    `margin` in `model`, with their continuations: where two correct implementations may round differently, only
    clear choices can be compared."""
    gen, found = torch.Generator().manual_seed(2), []
    while len(found) < count:
        prompt = [1] + torch.randint(3, 320, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen).tolist()
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_id=None)
            top = model(out)[0, len(prompt) - 1:-1].topk(2).values  # [new, 2]
        if (top[:, 0] - top[:, 1]).min() > margin:
            found.append((prompt, out[0, len(prompt):].tolist()))
    return found


@pytest.mark.parametrize("kind", ["F32", "BF16"])
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, exes, kind):
    model = tiny_llama(1)
    gguf = save_gguf(model, tmp_path / f"m-{kind}.gguf", kind)
    if kind == "F32":
        cases = [([1], 24), ([1, 17, 250, 3, 99, 100, 101, 7, 8], 24)]  # any prompt: float32 on both sides
        cases = [(p, model.generate(torch.tensor([p]), max_new_tokens=n, eos_token_id=None)[0, len(p):].tolist())
                 for p, n in cases]
    else:  # llama.cpp rounds activations to bfloat16 at each product, ours keeps them in float32 around the weights
        model = model.to(torch.bfloat16).float()
        cases = clear_prompts(model, 3, 12, margin=0.1)
    for prompt, ours in cases:
        assert len(set(ours)) > 4  # a real continuation, not one token repeated
        assert llama_greedy(exes["llama-simple"], gguf, prompt, len(ours)) == ours, prompt


def test_q_and_k_permutation_matters(tmp_path, exes):
    """Without llama.cpp's q/k row permutation (RoPE pairs) the tokens part: the test above can fail."""
    import decoders.gguf as g

    model = tiny_llama(1)
    real = g.permute
    g.permute = lambda w, n_heads: w
    try:
        gguf = save_gguf(model, tmp_path / "unpermuted.gguf", "F32")
    finally:
        g.permute = real
    prompt = [1] + list(range(40, 56))
    with torch.inference_mode():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=24, eos_token_id=None)[0, len(prompt):].tolist()
    assert llama_greedy(exes["llama-simple"], gguf, prompt, 24) != ours


def test_llama_bench_json_is_read(tmp_path, exes):
    gguf = save_gguf(tiny_llama(3), tmp_path / "b.gguf", "F32")
    speeds = llama_bench(exes["llama-bench"], gguf, threads=1, n_prompt=16, n_gen=8, repeats=1)
    assert set(speeds) == {"prefill", "decode"} and all(v > 0 for v in speeds.values())


def test_missing_build_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no llama-bench"):
        binaries(tmp_path)


@pytest.mark.parametrize("weights,gguf_type,cls,seed", [("q8_0a8", "Q8_0", W8A8Linear, 1),
                                                         ("q4_0a8", "Q4_0", W4A8Linear, 2)])
def test_int8_activations_pick_llama_cpps_tokens(tmp_path, exes, weights, gguf_type, cls, seed):
    """A Q8_0 file run as W8A8 (`mm.eval.llama_cpp`'s q8_0a8: int8 weights per channel from its blocks, activations
    int8 per token) or a Q4_0 file as W4A8 (q4_0a8: its 4-bit blocks times int8 activations in blocks of 32, llama.cpp's
    own product) and by llama.cpp (activations int8 in blocks of 32): the same tokens where choices are clear."""
    gguf = save_gguf(tiny_llama(seed), tmp_path / f"{weights}.gguf", gguf_type)
    ours = ours_for(None, weights, gguf)
    assert any(isinstance(m, cls) for m in ours.modules())
    for prompt, tokens in clear_prompts(ours, 3, 12, margin=0.5):
        assert len(set(tokens)) > 4
        assert llama_greedy(exes["llama-simple"], gguf, prompt, len(tokens)) == tokens, prompt
