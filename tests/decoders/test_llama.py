"""Parity of our Llama with transformers' LlamaForCausalLM on random checkpoints in the real on-disk format."""
import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from decoders import CheckpointError, KVCache, LlamaConfig, LlamaForCausalLM, next_token_loss

from tests.decoders.hf_llama import TINY, make_hf_llama


def left_padded_batch(seed=0, T=12, pads=(0, 5, 9)):
    """Random ids [3, T] and a mask whose rows start with `pads` padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def test_logits_match_transformers_on_left_padded_batch(hf_llama):
    name, path, ref = hf_llama
    ours = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate() uses for left padding
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() < 1e-4
    # left padding does not change a sequence: row 1 equals the same tokens alone, unpadded
    with torch.no_grad():
        alone = ours(ids[1:2, 5:])
    assert (alone[0] - got[1, 5:]).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers_generate(hf_llama):
    name, path, ref = hf_llama
    ours = LlamaForCausalLM.from_pretrained(path)
    ids, mask = left_padded_batch(seed=1)
    # single prompt: no EOS so that all 32 tokens are compared
    expected = ref.generate(ids[:1], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids[:1], max_new_tokens=32, eos_token_id=None)
    assert expected.shape[1] == ids.shape[1] + 32
    assert torch.equal(got, expected)
    # left-padded batch, with the checkpoint's EOS (finished rows are padded, as transformers does)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32)
    assert torch.equal(got, expected)


def test_cached_decoding_equals_full_recompute(hf_llama):
    name, path, _ = hf_llama
    model = LlamaForCausalLM.from_pretrained(path)
    ids, mask = left_padded_batch(seed=2, T=20, pads=(0, 3))
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(2, 20)
        chunks = [model(ids[:, :8], mask[:, :8], kv_cache=cache)]  # prefill
        for t in range(8, 12):  # one token at a time
            chunks.append(model(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache))
        chunks.append(model(ids[:, 12:15], mask[:, :15], kv_cache=cache))  # chunked prefill: q_len != kv_len
        chunks.append(model(ids[:, 15:], mask, kv_cache=cache))
    cached = torch.cat(chunks, dim=1)
    assert cache.length == 20
    assert (cached - full)[mask.bool()].abs().max().item() < 1e-4


def test_save_pretrained_loads_in_transformers_with_identical_logits(hf_llama, tmp_path):
    import transformers

    name, path, _ = hf_llama
    ours = LlamaForCausalLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings == ours.config.tie_word_embeddings
    assert back.config.num_key_value_heads == ours.config.num_key_value_heads
    ids, _ = left_padded_batch(pads=(0,))
    original = transformers.LlamaForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(t, original[k]) for k, t in back.state_dict().items())  # the same weights, bit for bit
    with torch.no_grad():  # the same logits, up to the order of float32 sums (our prefill products run on oneDNN)
        expected = back(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    # our own reload is exact too, and keeps the config
    again = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert again.config == ours.config


def test_sharded_checkpoint_round_trip(tmp_path):
    import transformers

    ref = make_hf_llama(tmp_path / "ref", num_key_value_heads=2)
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ids, _ = left_padded_batch(pads=(0,))
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(tmp_path / "sharded")(ids), expected, rtol=0,
                                   atol=2e-5 * expected.abs().max().item())  # float32 sums in oneDNN's order
        assert torch.equal(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded")(ids).logits, expected)


def test_bfloat16_load_and_save(tmp_path):
    import transformers

    make_hf_llama(tmp_path / "ref", num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.bfloat16).eval()
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids, _ = left_padded_batch(pads=(0,))
    with torch.no_grad():
        expected, got = ref(ids).logits.float(), ours(ids).float()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    assert torch.equal(ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0),
                       ours.generate(ids, max_new_tokens=8, eos_token_id=None))
    ours.save_pretrained(tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    back = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def hf_to_meta(sd, cfg):
    """Hugging Face -> Meta consolidated keys, undoing the q/k permutation (written independently of ours)."""
    D, out = cfg.head_dim, {}

    def unpermute(w, n):  # halves layout back to interleaved pairs
        return w.view(n, 2, D // 2, w.shape[1]).transpose(1, 2).reshape(n * D, w.shape[1])

    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = v
        elif k == "model.norm.weight":
            out["norm.weight"] = v
        elif k == "lm_head.weight":
            out["output.weight"] = v
        else:
            _, _, i, rest = k.split(".", 3)
            mod = rest.removesuffix(".weight")
            if mod == "self_attn.q_proj":
                v = unpermute(v, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                v = unpermute(v, cfg.num_key_value_heads)
            out[f"layers.{i}.{names[mod]}.weight"] = v
    return out


def test_rope_frequencies_stay_float32_through_dtype_casts():
    """`.to(bfloat16)` rounds every float tensor it owns; RoPE's inv_freq must not be rounded (at position 3000 a
    frequency rounded to bf16 moves its angle by up to 3000 * 2^-9 ~ 6 radians): it stays float32, equal to the formula, through casts."""
    from decoders.llama import rope_cos_sin, rope_inv_freq

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    exact = rope_inv_freq(model.config)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(torch.bfloat16).float()):
        m = cast(LlamaForCausalLM(LlamaConfig(**TINY)))
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, exact)
    pos = torch.tensor([[3000]])
    cos, _ = rope_cos_sin(m.inv_freq, pos, torch.float32)
    cos_rounded, _ = rope_cos_sin(exact.to(torch.bfloat16).float(), pos, torch.float32)
    assert torch.allclose(cos, rope_cos_sin(exact, pos, torch.float32)[0])
    assert (cos - cos_rounded).abs().max() > 0.2  # what a rounded buffer does (0.29 here)



@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_consolidated_checkpoint(tmp_path, n_shards):
    ref = make_hf_llama(tmp_path / "hf", num_key_value_heads=2)
    meta = hf_to_meta(ref.state_dict(), ref.config)
    split_dim = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    for s in range(n_shards):
        shard = {}
        for k, v in meta.items():
            dim = split_dim.get(k.split(".")[-2])
            shard[k] = v.clone() if dim is None else v.chunk(n_shards, dim=dim)[s].clone()
        torch.save(shard, tmp_path / f"consolidated.{s:02d}.pth")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-6,
                  rope_theta=10000.0)
    (tmp_path / "params.json").write_text(json.dumps(params))
    ours = LlamaForCausalLM.from_meta(tmp_path)
    ids, _ = left_padded_batch(pads=(0,))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


def test_kv_cache_bytes_equal_formula():
    for kv_heads in (4, 2, 1):  # MHA, GQA, MQA
        cfg = LlamaConfig(**{**TINY, "num_key_value_heads": kv_heads})
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        cache = model.new_kv_cache(batch_size=3, max_tokens=50)
        # the formula from the Hugging Face config's numbers: 2 (K and V) x layers x batch x kv heads x
        # (hidden / heads) x tokens x 2 bytes; against the bytes of the storages the cache holds
        formula = 2 * TINY["num_hidden_layers"] * 3 * kv_heads * (TINY["hidden_size"] // TINY["num_attention_heads"]) * 50 * 2
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.k + cache.v}
        assert sum(storages.values()) == formula == cache.nbytes
    assert KVCache(2, 1, 4, 16, 10).nbytes == 4 * KVCache(2, 1, 1, 16, 10).nbytes  # MQA cuts by the head ratio


def test_decode_step_allocates_no_cache_memory():
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 2})).eval()
    cache = model.new_kv_cache(1, 16)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), kv_cache=cache)
        model(torch.tensor([[8]]), kv_cache=cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs and cache.length == 4
    assert all(t[:, :, 4:].abs().sum() == 0 and t[:, :, :4].abs().sum() > 0 for t in cache.k + cache.v)


def test_loss_matches_transformers(tmp_path):
    ref = make_hf_llama(tmp_path, num_key_value_heads=2)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids, _ = left_padded_batch(pads=(0, 0))
    labels = ids.clone()
    labels[:, :5] = -100  # answer-only loss: prompt positions ignored
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=labels).loss
        got = next_token_loss(ours(ids), labels)
    assert abs(got.item() - expected.item()) < 1e-5
    with pytest.raises(ValueError, match="nothing to learn"):
        next_token_loss(ours(ids), torch.full_like(labels, -100))


def test_tiny_model_overfits_text():
    text = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
            "To be or not to be, that is the question. All that glitters is not gold; fortune favours the bold.")
    data = torch.tensor([list(text.encode())])  # byte-level ids [1, T]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg)
    for m in model.modules():  # the constructor leaves torch defaults; use Llama's N(0, 0.02)
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        loss = next_token_loss(model(data), data)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.05
    model.eval()  # and it now recites the text greedily from its first 10 bytes
    out = model.generate(data[:, :10], max_new_tokens=30, eos_token_id=None)
    assert torch.equal(out, data[:, :40])


def test_sampling_is_seeded_and_filters(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    ids, _ = left_padded_batch(pads=(0,))
    kw = dict(max_new_tokens=16, eos_token_id=None, temperature=1.0)
    a = model.generate(ids, seed=7, **kw)
    assert torch.equal(a, model.generate(ids, seed=7, **kw))
    assert not torch.equal(a, model.generate(ids, seed=8, **kw))
    greedy = model.generate(ids, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(model.generate(ids, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(model.generate(ids, seed=3, top_p=1e-6, **kw), greedy)


def test_generation_stops_at_any_of_several_eos_ids(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    ids, _ = left_padded_batch(pads=(0,))
    free = model.generate(ids, max_new_tokens=12, eos_token_id=None)[0, 12:].tolist()
    stop_a, stop_b = free[4], free[2]  # the 5th and 3rd generated tokens
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[stop_a, stop_b])[0, 12:].tolist()
    first = min(free.index(stop_a), free.index(stop_b))
    assert out == free[:first + 1]


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_llama(path, num_key_value_heads=2)
    return path


def test_bad_prompts_give_clear_errors(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the context window of 256"):
        model(torch.ones(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="no room to generate"):
        model.generate(torch.ones(1, 256, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.generate(torch.tensor([[-1, 5]]))
    # close to the window: generation stops at the window instead of overflowing
    assert model.generate(torch.ones(1, 250, dtype=torch.long), max_new_tokens=20, eos_token_id=None).shape[1] == 256


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_and_truncated_safetensors(tiny_dir, tmp_path):
    bad = copy_checkpoint(tiny_dir, tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        LlamaForCausalLM.from_pretrained(bad)
    junk = copy_checkpoint(tiny_dir, tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(junk)
    (junk / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        LlamaForCausalLM.from_pretrained(junk)
    with pytest.raises(CheckpointError, match="not a model directory"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")


def edit_weights(src, dst, edit):
    from safetensors.torch import load_file, save_file

    d = copy_checkpoint(src, dst)
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_missing_unexpected_and_misshapen_tensors_are_listed(tiny_dir, tmp_path):
    d = edit_weights(tiny_dir, tmp_path / "missing", lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: layers\.1\.mlp\.down_proj\.weight"):
        LlamaForCausalLM.from_pretrained(d)
    d = edit_weights(tiny_dir, tmp_path / "extra", lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1: extra\.weight"):
        LlamaForCausalLM.from_pretrained(d)
    d = edit_weights(tiny_dir, tmp_path / "shape",
                     lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"norm\.weight: expected \(64,\), got \(65,\)"):
        LlamaForCausalLM.from_pretrained(d)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    d = copy_checkpoint(tiny_dir, tmp_path / "cfg")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_up_proj\.weight: expected \(200, 64\), got \(192, 64\)"):
        LlamaForCausalLM.from_pretrained(d)


def test_config_reads_transformers_4_and_5_rope_layouts():
    old = dict(TINY, model_type="llama", rope_theta=500000.0,
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})
    new = dict(TINY, model_type="llama", rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                                          "rope_theta": 500000.0})
    a, b = LlamaConfig.from_hf(old), LlamaConfig.from_hf(new)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(a.to_hf()) == a
    with pytest.raises(ValueError, match="must divide"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf(dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_decode_step_with_cache_lengths_equals_masked_step():
    """The FlashDecoding entry (`cache_lens`, used on CUDA without padding) gives the masked step's logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 2})).eval()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        full = model(ids)
        for use_lens in (False, True):
            cache = model.new_kv_cache(2, 16)
            model(ids[:, :6], kv_cache=cache)
            key_mask = torch.zeros(2, 16, dtype=torch.bool)
            key_mask[:, :6] = True
            for slot in range(6, 9):
                key_mask[:, slot] = True
                lens = torch.full((2,), slot + 1) if use_lens else None
                logits = model.decode_step(ids[:, slot:slot + 1], torch.full((2, 1), slot), torch.tensor([slot]),
                                           key_mask, cache, lens)
                assert (logits[:, 0] - full[:, slot]).abs().max().item() < 1e-4


def test_compiled_decode_step_gives_the_eager_tokens(tiny_dir):
    """The torch.compile'd decode step (frozen weights, inductor GEMMs) decodes exactly like the eager one."""
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    ids, mask = left_padded_batch(seed=4, pads=(0, 4))
    eager = model.generate(ids, mask, max_new_tokens=12, eos_token_id=None)
    eager_short = model.generate(ids[:, 3:], mask[:, 3:], max_new_tokens=5, eos_token_id=None)
    compiled = model.generate(ids, mask, max_new_tokens=12, eos_token_id=None, compile=True)
    assert model.compiled_decode_step is not None  # kept for the next call
    assert torch.equal(compiled, eager)
    # once compiled, generate keeps using the compiled step, also for a prompt of another length
    assert torch.equal(model.generate(ids[:, 3:], mask[:, 3:], max_new_tokens=5, eos_token_id=None), eager_short)


def test_two_models_of_one_shape_compile_their_own_weights(tiny_dir, caplog):
    """Each model's compiled step holds its own frozen weights, also at batch 1 where the step may come from
    inductor's cache (dynamo skips guards on the modules, so a shared step would run the first model's weights; and
    inductor's FX graph cache, whose key leaves out frozen weights, served the first model's step to the second once
    the process had compiled another step: the bf16 one here). Each compile says what it compiles and how long it
    took; a second call of the same shape compiles nothing."""
    ids = left_padded_batch(seed=5, pads=(0,))[0][:1]
    LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).generate(ids, max_new_tokens=2, compile=True)
    caplog.clear()
    first = LlamaForCausalLM.from_pretrained(tiny_dir)
    second = LlamaForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1.5)
    eager = [m.generate(ids, max_new_tokens=8, eos_token_id=None) for m in (first, second)]
    assert not torch.equal(*eager)
    with caplog.at_level(logging.WARNING, logger="decoders.compile"):
        for m, expected in zip((first, second), eager):
            assert torch.equal(m.generate(ids, max_new_tokens=8, eos_token_id=None, compile=True), expected)
        assert torch.equal(first.generate(ids, max_new_tokens=8, eos_token_id=None, compile=True), eager[0])
    said = [r.getMessage() for r in caplog.records if r.name == "decoders.compile"]
    assert said[0::2] == ["compiling the decode step for batch 1, float32, 256 cache slots: 20-130 s on a CPU, once "
                          "per model and shape in a process"] * 2
    assert len(said) == 4 and all(re.fullmatch(r"compiled the decode step in \d+ s", m) for m in said[1::2])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_decode_attention_equals_sdpa(dtype, tol):
    from decoders.attention import fused_decode_attention

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, S, D = 2, 2, 3, 37, 16  # GQA: 3 query heads per key/value head folded into the query axis
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((B, Hkv, G, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    seen = torch.rand(B, 1, 1, S, generator=g) < 0.7
    seen[..., 0] = True
    mask = torch.zeros(B, 1, 1, S, dtype=dtype).masked_fill(~seen, float("-inf"))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    out = fused_decode_attention(q, k, v, mask)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < tol


def test_llama3_rope_frequencies_equal_transformers():
    """Llama 3.1's RoPE constants (head 128, theta 500000, factor 8 over an 8192 context): the long waves slowed
    down, the short ones kept, and the ones in between smoothly blended, all equal to transformers'."""
    import math

    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from decoders.llama import rope_inv_freq

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                  rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    got = rope_inv_freq(LlamaConfig.from_hf(hf.to_dict()))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    plain = 500000.0 ** -(torch.arange(0, 128, 2).double() / 128)
    wavelen = 2 * math.pi / plain
    in_band = (wavelen > 8192 / 4) & (wavelen < 8192 / 1)
    assert in_band.sum() >= 5  # the blend is exercised, not only the two plain regimes
    assert not torch.allclose(got[in_band].double(), plain[in_band]) and not torch.allclose(got[in_band].double(), plain[in_band] / 8)


@pytest.mark.parametrize("params,context", [
    (dict(norm_eps=1e-6), 2048),  # Llama 1
    (dict(norm_eps=1e-5), 4096),  # Llama 2
    (dict(norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256), 8192),  # Llama 3
    (dict(norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True), 131072),  # Llama 3.1, 3.2, 3.3
    (dict(norm_eps=1e-5, max_seq_len=1024), 1024),
])
def test_meta_params_without_max_seq_len_get_their_models_context(params, context):
    from decoders.convert_meta import hf_config_from_meta_params

    sd = {"tok_embeddings.weight": torch.zeros(97, 64), "layers.0.feed_forward.w1.weight": torch.zeros(96, 64)}
    cfg = LlamaConfig.from_hf(hf_config_from_meta_params(dict(dim=64, n_layers=1, n_heads=4, **params), sd))
    assert cfg.max_position_embeddings == context
