"""Continuous batching: each request's tokens equal `generate` on its prompt alone, however requests come and go."""
import threading

import pytest
import torch

from decoders import LlamaConfig, LlamaForCausalLM, generate
from decoders.batching import BatchingEngine

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, bos_token_id=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    with torch.no_grad():  # sharp attention, so a token's position and its neighbours' keys decide what comes next
        for layer in model.layers:
            layer.self_attn.qkv_proj.weight.mul_(4)
    return model


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 97, (n,), generator=g)


def alone(model, ids, n, **kw):
    """The new tokens of plain `generate` on one prompt."""
    return generate(model, ids[None], max_new_tokens=n, eos_token_id=kw.pop("eos_token_id", None), **kw)[0, len(ids):].tolist()


def test_requests_joining_and_leaving_get_the_tokens_of_generate_alone(model):
    engine = BatchingEngine(model, max_batch=3)
    a, b, c, d = prompt(5, 1), prompt(11, 2), prompt(3, 3), prompt(8, 4)
    ra = engine.submit(a, max_new_tokens=20)
    rb = engine.submit(b, max_new_tokens=4)  # finishes early and frees row 1
    engine.step()
    engine.step()
    assert not rb.done.is_set()
    rd = engine.submit(d, max_new_tokens=9)  # joins row 2 two steps later
    engine.step()
    assert engine.rows[2] is rd
    assert rb.done.is_set() and rb.finish_reason == "length" and engine.rows[1] is None
    rc = engine.submit(c, max_new_tokens=12)
    engine.step()
    assert engine.rows[1] is rc  # the freed row went to the newcomer
    while engine.step():
        pass
    assert ra.tokens == alone(model, a, 20)
    assert rb.tokens == alone(model, b, 4)
    assert rc.tokens == alone(model, c, 12)
    assert rd.tokens == alone(model, d, 9)
    # fewer steps than running the four one after another: they shared decode steps
    assert engine.steps < 20 + 4 + 12 + 9 - 4


def test_eos_ends_a_request_and_is_its_last_token(model):
    p = prompt(6, 5)
    full = alone(model, p, 15)
    eos = full[4]
    engine = BatchingEngine(model, max_batch=2)
    r = engine.submit(p, max_new_tokens=15, eos_token_id=eos)
    other = engine.submit(prompt(4, 6), max_new_tokens=15)
    while engine.step():
        pass
    assert r.finish_reason == "stop" and r.tokens == full[:full.index(eos) + 1]
    assert other.tokens == alone(model, prompt(4, 6), 15) and other.finish_reason == "length"


def test_seeded_sampling_reproduces_generate_with_that_seed(model):
    opts = dict(temperature=0.9, top_k=30, top_p=0.95, seed=7)
    p = prompt(7, 8)
    want = alone(model, p, 16, **opts)
    for neighbours in (0, 2):  # alone in the engine, and beside greedy and differently seeded requests
        engine = BatchingEngine(model, max_batch=3)
        others = [engine.submit(prompt(3 + k, 20 + k), max_new_tokens=10, temperature=1.0, seed=k) for k in range(neighbours)]
        r = engine.submit(p, max_new_tokens=16, **opts)
        while engine.step():
            pass
        assert r.tokens == want
        assert all(len(o.tokens) == 10 for o in others)
    assert want != alone(model, p, 16)  # it did sample


def test_prompt_embeddings_prefill_like_ids(model):
    p = prompt(9, 9)
    engine = BatchingEngine(model, max_batch=2)
    with torch.inference_mode():
        emb = model.embed_tokens(p) + torch.randn(9, 64, generator=torch.Generator().manual_seed(0))  # [T, D]
    r = engine.submit(p, max_new_tokens=8, inputs_embeds=emb)
    while engine.step():
        pass
    with torch.inference_mode():
        want = generate(model, p[None], max_new_tokens=8, eos_token_id=None, inputs_embeds=emb[None])
    assert r.tokens == want[0, 9:].tolist() != alone(model, p, 8)


def test_thread_streams_concurrent_requests_and_cancels(model):
    engine = BatchingEngine(model, max_batch=4).start()
    prompts = [prompt(3 + 2 * k, 30 + k) for k in range(6)]
    streamed = {}

    def client(k):
        req = engine.submit(prompts[k], max_new_tokens=10 + k)
        streamed[k] = list(req)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    victim = engine.submit(prompt(5, 40), max_new_tokens=60)
    next(iter(victim))
    engine.cancel(victim)
    assert victim.result(30) and victim.finish_reason == "cancelled" and len(victim.tokens) < 59
    engine.stop()
    for k in range(6):
        assert streamed[k] == alone(model, prompts[k], 10 + k)


def test_bad_requests_are_clear_errors(model):
    engine = BatchingEngine(model, max_batch=2, max_tokens=32)
    with pytest.raises(ValueError, match="no room to generate in the context window of 32"):
        engine.submit(prompt(32, 1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([5, 200])
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([5, 6], temperature=-1)
    r = engine.submit(prompt(30, 2), max_new_tokens=10)  # budget cut to the room left: 2 tokens
    while engine.step():
        pass
    assert r.tokens == alone(model, prompt(30, 2), 2) and r.finish_reason == "length"
