"""Parity of DeepseekForCausalLM with transformers' DeepseekV3 / DeepseekV2 / Mixtral on random checkpoints saved by
transformers itself, and the latent cache of multi-head latent attention."""
import json

import pytest
import torch

from decoders import CheckpointError, KVCache
from decoders.deepseek import DeepseekConfig, DeepseekForCausalLM
from decoders.mla import LatentCache, latent_cache_bytes

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8, "rope_theta": 10000.0}  # mscale != mscale_all_dim: both factors matter
MLA_DIMS = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
VARIANTS = {  # name: (transformers class name, config kwargs)
    # V3 shape: q_lora, 4 groups of 2 experts with 2 kept, a correction bias (set below), YaRN, interleaved rope dims
    "v3": ("DeepseekV3", dict(TINY, **MLA_DIMS, q_lora_rank=24, intermediate_size=96, moe_intermediate_size=32,
                              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                              first_k_dense_replace=1, routed_scaling_factor=2.5, rope_parameters=YARN)),
    "v3_halves": ("DeepseekV3", dict(TINY, **MLA_DIMS, q_lora_rank=24, intermediate_size=96, moe_intermediate_size=32,
                                     n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
                                     topk_group=1, first_k_dense_replace=0, norm_topk_prob=False, rope_interleave=False,
                                     tie_word_embeddings=True)),
    # V2-Lite shape: no q_lora, softmax greedy top-k, two shared experts, YaRN
    "v2_lite": ("DeepseekV2", dict(TINY, **MLA_DIMS, q_lora_rank=None, intermediate_size=96, moe_intermediate_size=32,
                                   n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
                                   topk_method="greedy", rope_parameters=YARN)),
    "v2_grouped": ("DeepseekV2", dict(TINY, **MLA_DIMS, q_lora_rank=24, intermediate_size=96, moe_intermediate_size=32,
                                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                                      topk_group=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                      routed_scaling_factor=1.5)),
    "mixtral": ("Mixtral", dict(TINY, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2)),
}


def make_hf(path, variant, seed=0, **overrides):
    """Save a random transformers model of `variant` to `path`; returns the reference in eval mode."""
    import transformers

    name, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(**{**kw, **overrides})
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the N(0, 0.02) init gives flat logits: widen it so greedy paths are clear
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.dim() > 1 else torch.rand(p.shape, generator=g) + 0.5)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)  # moves which experts win (checked below)
    model.save_pretrained(path)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=list(VARIANTS), scope="module")
def hf_model(request, tmp_path_factory):
    """(variant, checkpoint dir, transformers model) for each variant."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_hf(path, request.param)


def left_padded_batch(seed=0, T=12, pads=(0, 5, 9)):
    """Random ids [len(pads), T] and a mask whose rows start with `pads` padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p], ids[row, :p] = 0, 0
    return ids, mask


def rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def test_logits_match_transformers_on_left_padded_batch(hf_model):
    name, path, ref = hf_model
    ours = DeepseekForCausalLM.from_pretrained(path)
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate() uses for left padding
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
        alone = ours(ids[1:2, 5:])
    real = mask.bool()
    assert rel_err(got[real], expected[real]) < 1e-4
    assert rel_err(alone[0], got[1, 5:]) < 1e-4  # left padding does not change a sequence


def test_greedy_tokens_match_transformers_generate(hf_model):
    name, path, ref = hf_model
    ours = DeepseekForCausalLM.from_pretrained(path)
    ids, mask = left_padded_batch(seed=1)
    expected = ref.generate(ids[:1], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids[:1], max_new_tokens=24, eos_token_id=None)
    assert expected.shape[1] == ids.shape[1] + 24 and torch.equal(got, expected)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None), expected)
    # with the checkpoint's EOS, finished rows are padded as transformers pads them
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0), expected)


def test_cached_decoding_equals_full_recompute(hf_model):
    name, path, _ = hf_model
    model = DeepseekForCausalLM.from_pretrained(path)
    ids, mask = left_padded_batch(seed=2, T=20, pads=(0, 3))
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(2, 20)
        chunks = [model(ids[:, :8], mask[:, :8], kv_cache=cache)]  # prefill
        for t in range(8, 12):  # one token at a time (MLA: the absorbed form)
            chunks.append(model(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache))
        chunks.append(model(ids[:, 12:15], mask[:, :15], kv_cache=cache))  # a chunk over a longer cache
        chunks.append(model(ids[:, 15:], mask, kv_cache=cache))
    assert cache.length == 20
    assert rel_err(torch.cat(chunks, dim=1)[mask.bool()], full[mask.bool()]) < 1e-4


@pytest.mark.parametrize("variant", ["v3", "v2_lite"])
def test_absorbed_attention_equals_naive(tmp_path, variant):
    make_hf(tmp_path, variant)
    model = DeepseekForCausalLM.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(seed=3, T=16)
    out = {}
    for form in ("naive", "absorbed"):
        for layer in model.layers:
            layer.self_attn.form = form
        with torch.no_grad():
            out[form] = (model(ids, attention_mask=mask)[mask.bool()], model(ids[:1]))  # padded; square causal
    assert rel_err(out["absorbed"][0], out["naive"][0]) < 1e-5
    assert rel_err(out["absorbed"][1], out["naive"][1]) < 1e-5
    # and the decode step (absorbed over the whole static cache) gives the naive logits of the next token
    cache = model.new_kv_cache(1, 32)
    with torch.no_grad():
        model(ids[:1, :15], kv_cache=cache)
        key_mask = torch.zeros(1, 32, dtype=torch.bool)
        key_mask[:, :16] = True
        step = model.decode_step(ids[:1, 15:], torch.tensor([[15]]), torch.tensor([15]), key_mask, cache)
    assert rel_err(step[0, -1], out["naive"][1][0, -1]) < 1e-5


def test_latent_cache_holds_only_c_kv_and_k_rope_and_bytes_equal_formula():
    cfg = DeepseekConfig(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                         topk_group=2, first_k_dense_replace=1, **MLA_DIMS)
    model = DeepseekForCausalLM(cfg).to(torch.bfloat16)
    cache = model.new_kv_cache(batch_size=3, max_tokens=50)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.kv}
    # (kv_lora_rank + qk_rope_head_dim) x layers x batch x tokens x 2 bytes, from the config's numbers
    assert sum(storages.values()) == (16 + 8) * 3 * 3 * 50 * 2 == cache.nbytes
    # DeepSeek-V3's own shape at 4096 tokens, against a GQA Llama of the same width (128 heads of 128, 8 KV heads)
    mla = LatentCache(61, 1, 512 + 64, 4096, torch.bfloat16, device="meta")
    gqa = KVCache(61, 1, 8, 128, 4096, torch.bfloat16, device="meta")
    assert mla.nbytes == latent_cache_bytes(512, 64, 61, 4096) == 287_834_112
    assert gqa.nbytes == 2 * 61 * 8 * 128 * 4096 * 2 and gqa.nbytes / mla.nbytes == pytest.approx(3.556, abs=1e-3)


def test_save_pretrained_loads_in_transformers_with_identical_logits(hf_model, tmp_path):
    import transformers

    name, path, ref = hf_model
    ours = DeepseekForCausalLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out", max_shard_bytes=60_000)  # sharded, with an index
    assert len(set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    cls = getattr(transformers, f"{VARIANTS[name][0]}ForCausalLM")
    back = cls.from_pretrained(tmp_path / "out").eval()
    ids, _ = left_padded_batch(pads=(0,))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
    again = DeepseekForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config == ours.config
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_bfloat16_keeps_routers_in_float32_and_matches_transformers(tmp_path):
    import transformers

    make_hf(tmp_path, "v3")
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = DeepseekForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.layers[1].mlp.gate.weight.dtype == torch.float32
    assert ours.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids, _ = left_padded_batch(pads=(0, 0))
    with torch.no_grad():
        expected, got = ref(ids).logits.float(), ours(ids).float()
    assert rel_err(got, expected) < 0.05
    assert torch.equal(ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0),
                       ours.generate(ids, max_new_tokens=8, eos_token_id=None))


def test_sampling_and_streaming_reuse_the_generation_loop(tmp_path):
    from decoders import stream_tokens

    make_hf(tmp_path, "mixtral")
    model = DeepseekForCausalLM.from_pretrained(tmp_path)
    ids, _ = left_padded_batch(pads=(0,))
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    streamed = torch.stack(list(stream_tokens(model, ids, max_new_tokens=10, eos_token_id=None)), dim=1)
    assert torch.equal(streamed, greedy[:, ids.shape[1]:])
    a = model.generate(ids, max_new_tokens=10, eos_token_id=None, temperature=1.0, seed=5)
    b = model.generate(ids, max_new_tokens=10, eos_token_id=None, temperature=1.0, seed=5)
    c = model.generate(ids, max_new_tokens=10, eos_token_id=None, temperature=5.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mm_load_opens_the_three_model_types(tmp_path):
    from mm.models.formats import detect, load

    for variant in ("v3", "v2_lite", "mixtral"):
        make_hf(tmp_path / variant, variant)
        model = load(tmp_path / variant)
        assert isinstance(model, DeepseekForCausalLM) and detect(tmp_path / variant) == model.config.model_type


def test_bad_checkpoints_name_the_problem(tmp_path):
    make_hf(tmp_path, "v3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_routed_experts": 16}))
    with pytest.raises(CheckpointError, match=r"layer 1 has experts .*n_routed_experts=16"):
        DeepseekForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "scoring_func": "relu"}))
    with pytest.raises(CheckpointError, match=r"config.json: config scoring_func 'relu'"):
        DeepseekForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": 32}))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.weight: expected \(40, 64\), got \(24, 64\)"):
        DeepseekForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        DeepseekConfig.from_hf({"model_type": "llama"})

