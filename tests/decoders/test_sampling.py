"""Sampling against transformers' logits warpers (which tokens survive temperature, top-k, top-p) and against
softmax(logits / T) (how often each token is drawn)."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from decoders.generate import filter_logits, sample_next

N = 40000  # draws per frequency check: a token of probability p is off by more than 5 sigma with ~1e-6 chance


def draw_frequencies(logits, **kw):
    """How often each token is drawn from one row of logits [1, V] over N draws [V]."""
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits.expand(N, -1), generator=g, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / N


def assert_frequencies(freq, p):
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), (freq, p)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    assert_frequencies(draw_frequencies(logits, temperature=temperature), torch.softmax(logits[0] / temperature, -1))


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities 0.5, 0.3, 0.15, 0.05
    # 0.5 < 0.7: the second token crosses p and is kept; the mass before the third (0.8) already reaches p
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert_frequencies(draw_frequencies(logits, temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 0.9), (0.7, None, 0.5), (1.3, 5, None),
                                                    (0.8, 7, 0.6), (1.0, None, 0.05)])
def test_filter_equals_transformers_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g) * 2
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])
    if top_p is not None and top_k is None:  # the kept set is the smallest whose mass reaches p
        mass = torch.where(torch.isfinite(got), torch.softmax(logits / temperature, -1), 0.0).sum(-1)
        assert (mass >= top_p - 1e-6).all()


def test_top_k_draws_only_the_k_most_likely():
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.0, 1.0]])
    p = torch.softmax(torch.tensor([3.0, float("-inf"), 2.0, float("-inf"), 1.0]), -1)
    assert_frequencies(draw_frequencies(logits, temperature=1.0, top_k=3), p)


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits), logits.argmax(-1))
