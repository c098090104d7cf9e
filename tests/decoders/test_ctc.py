"""CTC head, greedy / prefix beam search, prefix scorer (vs ESPnet) and forced alignment (vs torchaudio)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio.functional as TAF
from espnet2.asr.ctc import CTC as EspnetCTC
from espnet.nets.ctc_prefix_score import CTCPrefixScore, CTCPrefixScoreTH

from decoders.checkpoint import load_state_dict_strict, read_torch
from decoders.ctc import (
    CTC,
    LOGZERO,
    CTCPrefixScorer,
    convert_espnet_ctc_state_dict,
    ctc_forced_align,
    ctc_greedy_decode,
    ctc_prefix_beam_search,
)


def test_ctc_head_and_loss_match_espnet(tmp_path):
    torch.manual_seed(0)
    V, D = 11, 16
    ref = EspnetCTC(V, D).eval()
    torch.save({f"ctc.{k}": v for k, v in ref.state_dict().items()} | {"decoder.x": torch.zeros(1)}, tmp_path / "m.pth")
    ours = load_state_dict_strict(CTC(V, D), convert_espnet_ctc_state_dict(read_torch(tmp_path / "m.pth")), "m.pth")
    enc = torch.randn(3, 9, D)
    enc_lengths = torch.tensor([9, 7, 5])
    ys = torch.tensor([[1, 2, 3, 4], [5, 5, -1, -1], [7, 8, 9, -1]])
    ys_lengths = torch.tensor([4, 2, 3])
    assert torch.allclose(ours.log_softmax(enc), ref.log_softmax(enc), atol=1e-6)
    expected = ref(enc, enc_lengths, ys, ys_lengths)
    got = ours.loss(enc, enc_lengths, ys, ys_lengths)
    assert abs(expected.item() - got.item()) < 1e-5
    # an impossible target (longer than the input) is zeroed, as ESPnet's zero_infinity
    short = torch.tensor([9, 7, 2])
    assert abs(ref(enc, short, ys, ys_lengths).item() - ours.loss(enc, short, ys, ys_lengths).item()) < 1e-5


def _peaked(path: list[int], V: int, peak: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Log-probs whose frame-wise argmax is `path` (random elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(path), V, generator=g)
    logits[torch.arange(len(path)), torch.tensor(path)] += peak
    return torch.log_softmax(logits, -1)


def test_greedy_collapses_repeats_and_drops_blank():
    paths = [[0, 3, 3, 0, 3, 2, 2, 0, 0, 1], [4, 4, 0, 0, 4, 0, 0, 0, 0, 0]]
    lp = torch.stack([_peaked(p, 6, seed=i) for i, p in enumerate(paths)])
    assert ctc_greedy_decode(lp) == [[3, 3, 2, 1], [4, 4]]
    # lengths cut the second utterance before its second 4
    assert ctc_greedy_decode(lp, torch.tensor([10, 3])) == [[3, 3, 2, 1], [4]]


def test_prefix_beam_search_beam1_is_greedy_on_dominant_path():
    path = [0, 2, 2, 0, 2, 5, 0, 1, 1, 0]
    lp = _peaked(path, 7, peak=6.0)
    (tokens, score), = ctc_prefix_beam_search(lp, beam_size=1)
    assert tokens == [2, 2, 5, 1] == ctc_greedy_decode(lp[None])[0]
    # beam 1 keeps a single prefix whose score sums exactly the best path's frame log-probs
    assert abs(score - lp.max(-1).values.sum().item()) < 1e-4


def test_prefix_beam_search_scores_are_exact_prefix_probabilities():
    """With a beam that never prunes, each final prefix score is log P(y | x), i.e. -ctc_loss."""
    torch.manual_seed(1)
    T, V = 5, 3
    lp = torch.randn(T, V).log_softmax(-1)
    nbest = ctc_prefix_beam_search(lp, beam_size=100)
    assert len(nbest) > 5
    for tokens, score in nbest:
        if tokens:
            ref = -F.ctc_loss(lp[:, None], torch.tensor([tokens]), torch.tensor([T]), torch.tensor([len(tokens)]),
                              reduction="sum")
        else:
            ref = lp[:, 0].sum()
        assert abs(score - ref.item()) < 1e-4, (tokens, score, ref)
    # all label sequences together carry all the probability
    assert abs(math.log(sum(math.exp(s) for _, s in nbest))) < 1e-4


def _reference_states(lp, lens, eos, steps, nh, partial):
    """Run ESPnet's CTCPrefixScoreTH and ours side by side, choosing the same hypotheses each step."""
    B, T, V = lp.shape
    ref = CTCPrefixScoreTH(lp.clone(), lens, 0, eos)
    ours = CTCPrefixScorer(lp, lens, eos)
    ys = [[eos] for _ in range(B * nh)]
    ref_state, state = None, ours.init_state(torch.arange(B).repeat_interleave(nh))
    g = torch.Generator().manual_seed(5)
    checked = 0
    for _ in range(steps):
        ids = None
        if partial:
            ids = torch.stack([torch.randperm(V - 2, generator=g)[:4] + 1 for _ in range(B * nh)])  # no blank, no eos
        expected, ref_out = ref([torch.tensor(y) for y in ys], ref_state, ids)
        got, out = ours.score(torch.tensor([y[-1] for y in ys]), state, ids)
        finite = expected > LOGZERO / 2
        assert torch.equal(finite, got > LOGZERO / 2)
        assert (expected[finite] - got[finite]).abs().max().item() < 1e-4
        checked += int(finite.sum())
        # keep the best nh extensions per utterance (excluding eos so that prefixes keep growing)
        sel = got.clone()
        sel[:, eos] = LOGZERO
        best = sel.view(B, -1).topk(nh, dim=1)[1]  # [B, nh] in hyp*V + token space
        ref_state = ref.index_select_state(ref_out, best)
        hyp = (best // V + torch.arange(B)[:, None] * nh).view(-1)
        tok = (best % V).view(-1)
        state = ours.select(out, hyp, tok)
        ys = [ys[h] + [t] for h, t in zip(hyp.tolist(), tok.tolist())]
        assert (ref_state[1][:, 0] - state.log_psi).abs().max().item() < 1e-4
    return checked, ys


@pytest.mark.parametrize("partial", [False, True])
def test_prefix_scorer_matches_espnet_th(partial):
    torch.manual_seed(2)
    B, T, V = 2, 12, 9
    lp = (torch.randn(B, T, V) * 2).log_softmax(-1)
    checked, ys = _reference_states(lp, torch.tensor([12, 8]), V - 1, steps=5, nh=3, partial=partial)
    assert checked > 50
    assert any(len(set(y)) > 3 for y in ys)  # hypotheses with repeated and distinct tokens were scored


def test_prefix_scorer_matches_espnet_numpy_scorer():
    """Single hypothesis against ESPnet's reference (non-vectorised) CTCPrefixScore, including a repeat."""
    import numpy as np

    torch.manual_seed(3)
    T, V, eos = 10, 7, 6
    lp = torch.randn(T, V).log_softmax(-1)
    ref = CTCPrefixScore(lp.numpy(), 0, eos, np)
    ours = CTCPrefixScorer(lp[None], torch.tensor([T]), eos)
    r_ref, prev = ref.initial_state(), 0.0
    state = ours.init_state(torch.zeros(1, dtype=torch.long))
    y = [eos]
    cs = np.arange(1, V)  # all but blank
    for nxt in [3, 3, 1, 5]:
        psi, r_new = ref(y, cs, r_ref)
        got, out = ours.score(torch.tensor([y[-1]]), state)
        assert np.abs((psi - prev) - got[0, 1:].numpy()).max() < 1e-4
        k = int(np.where(cs == nxt)[0][0])
        r_ref, prev = r_new[k], psi[k]  # ESPnet returns states label-major [S, T, 2]
        state = ours.select(out, torch.tensor([0]), torch.tensor([nxt]))
        y.append(nxt)


def test_forced_align_matches_torchaudio_on_random_input():
    torch.manual_seed(4)
    for tokens in ([1, 2, 3], [2, 2, 4, 4, 4, 1], [5], [1, 3, 1, 3, 2, 2]):
        T = 20
        lp = torch.randn(T, 6).mul(2).log_softmax(-1)
        ref_path, _ = TAF.forced_align(lp[None], torch.tensor([tokens], dtype=torch.int32), blank=0)
        ref_spans = TAF.merge_tokens(ref_path[0], torch.zeros(T))
        spans = ctc_forced_align(lp, tokens)
        assert [(s.token, s.start, s.end) for s in spans] == [(s.token, s.start, s.end) for s in ref_spans]
        assert [s.token for s in spans] == tokens
        assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


def test_forced_align_on_constructed_input():
    # frames:        0  1  2  3  4  5  6  7  8  9
    path = [0, 2, 2, 0, 0, 3, 0, 3, 3, 0]
    lp = _peaked(path, 5, peak=8.0)
    spans = ctc_forced_align(lp, [2, 3, 3])
    assert [(s.token, s.start, s.end) for s in spans] == [(2, 1, 3), (3, 5, 6), (3, 7, 9)]
    ref_path, _ = TAF.forced_align(lp[None], torch.tensor([[2, 3, 3]], dtype=torch.int32), blank=0)
    assert ref_path[0].tolist() == path
    assert all(0.9 < s.score <= 1.0 for s in spans)
    with pytest.raises(ValueError, match="cannot align 3 tokens"):
        ctc_forced_align(lp[:3], [2, 3, 3])
    with pytest.raises(ValueError, match="non-blank"):
        ctc_forced_align(lp, [2, 0])


def test_prefix_scorer_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        CTCPrefixScorer(torch.zeros(1, 4, 3), torch.tensor([5]), eos=2)


def test_exhaustive_prefix_probability_small():
    """psi(h) from the scorer equals the brute-force sum over all paths whose collapse starts with h."""
    torch.manual_seed(6)
    T, V, eos = 4, 4, 3
    lp = torch.randn(T, V).log_softmax(-1)
    scorer = CTCPrefixScorer(lp[None], torch.tensor([T]), eos)
    st = scorer.init_state(torch.zeros(1, dtype=torch.long))
    scores, out = scorer.score(torch.tensor([eos]), st)
    st = scorer.select(out, torch.tensor([0]), torch.tensor([1]))
    scores2, _ = scorer.score(torch.tensor([1]), st)

    def collapse(p):
        return [k for k, _ in itertools.groupby(p) if k != 0]

    def brute_psi(prefix):
        tot = 0.0
        for p in itertools.product(range(V), repeat=T):
            if collapse(p)[: len(prefix)] == prefix:
                tot += math.exp(sum(lp[t, k].item() for t, k in enumerate(p)))
        return math.log(tot)

    def brute_exact(seq):
        return math.log(sum(math.exp(sum(lp[t, k].item() for t, k in enumerate(p)))
                            for p in itertools.product(range(V), repeat=T) if collapse(p) == seq))

    assert abs(scores[0, 1].item() - brute_psi([1])) < 1e-4
    assert abs(scores[0, 2].item() - brute_psi([2])) < 1e-4
    assert abs((scores[0, 1] + scores2[0, 2]).item() - brute_psi([1, 2])) < 1e-4
    assert abs((scores[0, 1] + scores2[0, 1]).item() - brute_psi([1, 1])) < 1e-4
    assert abs((scores[0, 1] + scores2[0, eos]).item() - brute_exact([1])) < 1e-4
