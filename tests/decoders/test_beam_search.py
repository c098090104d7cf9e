"""Joint CTC/attention beam search against ESPnet's BatchBeamSearch, attention rescoring, and the hybrid loss
against ESPnetASRModel, all with random ESPnet weights loaded through our converters."""
import pytest
import torch
from espnet2.asr.ctc import CTC as EspnetCTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder as EspnetDecoder
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from espnet2.asr.espnet_model import ESPnetASRModel
from espnet.nets.batch_beam_search import BatchBeamSearch
from espnet.nets.scorers.ctc import CTCPrefixScorer as EspnetCTCScorer
from espnet.nets.scorers.length_bonus import LengthBonus

from decoders.asr_decoder import ASRDecoderConfig, TransformerDecoder, convert_espnet_decoder_state_dict
from decoders.beam_search import attention_rescoring, batch_beam_search, beam_search, hybrid_loss, weighted_beam_search
from decoders.checkpoint import load_state_dict_strict, read_torch
from decoders.ctc import CTC, convert_espnet_ctc_state_dict, ctc_prefix_beam_search
from decoders.scorers import CTCScorer, DecoderScorer, LengthBonus as OurLengthBonus

V, D = 40, 32
SOS = EOS = V - 1  # ESPnet's <sos/eos>
CONF = {"attention_heads": 4, "linear_units": 64, "num_blocks": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random ESPnet decoder + CTC with sharpened outputs (so hypotheses differ and end), saved as a .pth
    model file, and ours loaded from it."""
    torch.manual_seed(0)
    ref_dec = EspnetDecoder(V, D, **CONF).eval()
    ref_ctc = EspnetCTC(V, D).eval()
    with torch.no_grad():
        ref_dec.output_layer.weight.mul_(4.0)
        ref_dec.output_layer.bias[EOS] += 0.8  # lets pure attention search end before max length
        ref_ctc.ctc_lo.weight.mul_(4.0)
        ref_ctc.ctc_lo.bias[0] += 4.0  # blank-dominated frames, as a trained CTC: hypotheses end before T
    path = tmp_path_factory.mktemp("espnet") / "model.pth"
    sd = {f"decoder.{k}": v for k, v in ref_dec.state_dict().items()}
    sd |= {f"ctc.{k}": v for k, v in ref_ctc.state_dict().items()}
    torch.save(sd, path)
    sd = read_torch(path)
    dec = TransformerDecoder(ASRDecoderConfig.from_espnet(CONF, V, D)).eval()
    load_state_dict_strict(dec, convert_espnet_decoder_state_dict(sd), str(path))
    ctc = load_state_dict_strict(CTC(V, D), convert_espnet_ctc_state_dict(sd), str(path)).eval()
    return ref_dec, ref_ctc, dec, ctc


def espnet_search(ref_dec, ref_ctc, enc, beam, ctc_weight, length_bonus=0.0, maxlenratio=0.0, minlenratio=0.0,
                  hyp_primer=None):
    """ESPnet's BatchBeamSearch set up as espnet2/bin/asr_inference.py does."""
    scorers = {"decoder": ref_dec, "ctc": EspnetCTCScorer(ref_ctc, EOS), "length_bonus": LengthBonus(V)}
    weights = {"decoder": 1.0 - ctc_weight, "ctc": ctc_weight, "length_bonus": length_bonus}
    search = BatchBeamSearch(scorers=scorers, weights=weights, beam_size=beam, vocab_size=V, sos=SOS, eos=EOS,
                             pre_beam_score_key=None if ctc_weight == 1.0 else "full", hyp_primer=hyp_primer)
    assert search.__class__ is BatchBeamSearch
    with torch.no_grad():
        return search(enc, maxlenratio=maxlenratio, minlenratio=minlenratio)


def assert_same_nbest(ref_hyps, hyps, maxlen=None, prefix_len=1):
    assert len(ref_hyps) == len(hyps) > 0
    for r, h in zip(ref_hyps, hyps):
        assert h.yseq == r.yseq.tolist()
        tokens = r.yseq.tolist()[prefix_len:]
        while tokens[-1] == EOS:  # ESPnet ends every yseq with eos (twice when forced after an eos)
            tokens.pop()
        assert h.tokens == tokens
        assert abs(h.score - float(r.score)) < 1e-4
        for k, v in r.scores.items():
            assert abs(h.scores[k] - float(v)) < 1e-4, k
    assert len(hyps[0].tokens) >= 2  # non-trivial hypotheses
    assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
    if maxlen is not None:  # at least one hypothesis ended by choosing eos, not by the length limit
        assert any(len(h.tokens) < maxlen for h in hyps)


@pytest.mark.parametrize("ctc_weight,beam,length_bonus", [(0.3, 3, 0.0), (0.3, 5, 0.0), (0.5, 4, 0.5)])
def test_joint_beam_search_matches_espnet(models, ctc_weight, beam, length_bonus):
    ref_dec, ref_ctc, dec, ctc = models
    for seed in (1, 2):
        torch.manual_seed(seed)
        enc = torch.randn(16, D)
        ref_hyps = espnet_search(ref_dec, ref_ctc, enc, beam, ctc_weight, length_bonus)
        hyps = beam_search(dec, enc, ctc.log_softmax(enc[None])[0], sos=SOS, eos=EOS, beam_size=beam,
                           ctc_weight=ctc_weight, length_bonus=length_bonus)
        assert_same_nbest(ref_hyps, hyps, maxlen=16)
        assert any(h.tokens != hyps[0].tokens[: len(h.tokens)] for h in hyps[1:])  # real alternatives


def test_attention_beam_search_matches_espnet(models, beam=4):
    ref_dec, ref_ctc, dec, _ = models
    ended_early = 0
    for seed in (3, 4):
        torch.manual_seed(seed)
        enc = torch.randn(16, D)
        ref_hyps = espnet_search(ref_dec, ref_ctc, enc, beam, 0.0)
        hyps = beam_search(dec, enc, None, sos=SOS, eos=EOS, beam_size=beam, ctc_weight=0.0)
        assert_same_nbest(ref_hyps, hyps)
        assert set(hyps[0].scores) == {"decoder"}
        ended_early += sum(len(h.tokens) < 16 for h in hyps)
    assert ended_early > 0


def test_attention_beam_search_with_prefix_matches_espnet_primer(models):
    """Dolphin-style decoder prefix (<sos><lang><task>) against ESPnet's hyp_primer."""
    ref_dec, ref_ctc, dec, _ = models
    torch.manual_seed(11)
    enc = torch.randn(16, D)
    primer = [SOS, 1, 2]
    ref_hyps = espnet_search(ref_dec, ref_ctc, enc, 3, 0.0, hyp_primer=primer)
    hyps = beam_search(dec, enc, None, sos=SOS, eos=EOS, beam_size=3, ctc_weight=0.0, prefix=primer)
    assert_same_nbest(ref_hyps, hyps, prefix_len=3)
    assert all(h.yseq[:3] == primer for h in hyps)


@pytest.mark.parametrize("maxlenratio,minlenratio", [(0.5, 0.0), (-6.0, -3.0), (0.0, 0.3)])
def test_length_limits_match_espnet(models, maxlenratio, minlenratio):
    ref_dec, ref_ctc, dec, ctc = models
    torch.manual_seed(5)
    enc = torch.randn(16, D)
    ref_hyps = espnet_search(ref_dec, ref_ctc, enc, 4, 0.3, maxlenratio=maxlenratio, minlenratio=minlenratio)
    hyps = beam_search(dec, enc, ctc.log_softmax(enc[None])[0], sos=SOS, eos=EOS, beam_size=4, ctc_weight=0.3,
                       maxlenratio=maxlenratio, minlenratio=minlenratio)
    assert_same_nbest(ref_hyps, hyps)
    if maxlenratio != 0:
        maxlen = int(maxlenratio * 16) if maxlenratio > 0 else int(-maxlenratio)
        assert max(len(h.tokens) for h in hyps) <= maxlen


def test_ctc_only_search_matches_espnet(models):
    ref_dec, ref_ctc, _, ctc = models
    torch.manual_seed(6)
    enc = torch.randn(12, D)
    ref_hyps = espnet_search(ref_dec, ref_ctc, enc, 3, 1.0)
    hyps = beam_search(None, enc, ctc.log_softmax(enc[None])[0], sos=SOS, eos=EOS, beam_size=3, ctc_weight=1.0)
    assert_same_nbest(ref_hyps, hyps)


@pytest.mark.parametrize("ctc_weight", [0.3, 0.0])
def test_batch_beam_search_on_padded_batch(models, ctc_weight):
    """Hypotheses of several utterances scored together give each utterance ESPnet's own n-best."""
    ref_dec, ref_ctc, dec, ctc = models
    torch.manual_seed(7)
    enc = torch.randn(3, 16, D)
    lengths = torch.tensor([16, 11, 7])
    enc[1, 11:] = 100.0  # padding must not leak into the shorter utterances
    enc[2, 7:] = -50.0
    out = batch_beam_search(dec, enc, lengths, ctc.log_softmax(enc), sos=SOS, eos=EOS, beam_size=3,
                            ctc_weight=ctc_weight)
    assert len(out) == 3
    for b in range(3):
        ref_hyps = espnet_search(ref_dec, ref_ctc, enc[b, : lengths[b]], 3, ctc_weight)
        assert_same_nbest(ref_hyps, out[b])


def plain_beam_search(ref_dec, enc, beam, maxlen):
    """Textbook beam search over ESPnet's own decoder, every hypothesis rescored from scratch each step; running
    hypotheses end at maxlen with eos appended (ESPnet's yseq). The n-best as (yseq, score), best first."""
    running, ended = [([SOS], 0.0)], []
    for i in range(maxlen):
        cands = []
        for ys, s in running:
            lp = ref_dec.score(torch.tensor(ys), None, enc)[0]
            cands += [(ys + [c], s + float(lp[c])) for c in range(V)]
        cands.sort(key=lambda c: c[1], reverse=True)
        running = []
        for ys, s in cands[:beam]:
            if ys[-1] == EOS or i == maxlen - 1:
                ended.append((ys + ([EOS] if i == maxlen - 1 else []), s))
            else:
                running.append((ys, s))
        if not running:
            break
    return sorted(ended, key=lambda e: e[1], reverse=True)


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 3])
def test_search_with_the_decoder_scorer_alone_is_plain_beam_search(models, beam):
    """The scorer search with one scorer (weight 1, no pre-beam, no end detection) is the textbook beam search;
    beam 1 is greedy decoding."""
    ref_dec, _, dec, _ = models
    torch.manual_seed(12)
    enc = torch.randn(10, D)
    scorers = {"decoder": DecoderScorer(dec, enc[None], torch.tensor([10]))}
    hyps = weighted_beam_search(scorers, {"decoder": 1.0}, [8], vocab_size=V, eos=EOS, beam_size=beam, prefix=[SOS])[0]
    ref = plain_beam_search(ref_dec, enc, beam, 8)
    assert [h.yseq for h in hyps] == [ys for ys, _ in ref]
    assert [h.score for h in hyps] == pytest.approx([s for _, s in ref], abs=1e-4)
    assert all(h.scores["decoder"] == h.score for h in hyps)
    if beam == 1:  # greedy: each token the argmax of ESPnet's decoder after the tokens before it
        ys = hyps[0].yseq
        for i in range(1, min(len(ys) - 1, 8) + 1):  # the tokens scored: all but an eos appended at maxlen
            assert ys[i] == int(ref_dec.score(torch.tensor(ys[:i]), None, enc)[0].argmax())
    assert len(hyps[0].tokens) >= 2


@torch.no_grad()
@pytest.mark.parametrize("bonus", [0.7, -0.4])
def test_length_bonus_scorer_shifts_scores_as_espnet(models, bonus):
    """The length bonus scorer gives what ESPnet's LengthBonus gives, and a search with it (decoder + bonus, no
    CTC) equals ESPnet's BatchBeamSearch with the same two scorers: each hypothesis gains bonus per scored token."""
    ref_dec, _, dec, _ = models
    ys = torch.tensor([[SOS, 3, 4], [SOS, 5, 6]])
    ref_scores = LengthBonus(V).batch_score(ys, None, torch.zeros(2, 5, D))[0]
    assert torch.equal(OurLengthBonus(V).score(ys, None)[0], ref_scores)
    torch.manual_seed(13)
    enc = torch.randn(12, D)
    search = BatchBeamSearch(scorers={"decoder": ref_dec, "length_bonus": LengthBonus(V)},
                             weights={"decoder": 1.0, "length_bonus": bonus}, beam_size=3, vocab_size=V, sos=SOS,
                             eos=EOS, pre_beam_score_key="full")
    ref_hyps = search(enc, maxlenratio=0.0, minlenratio=0.0)
    scorers = {"decoder": DecoderScorer(dec, enc[None], torch.tensor([12])), "length_bonus": OurLengthBonus(V)}
    hyps = weighted_beam_search(scorers, {"decoder": 1.0, "length_bonus": bonus}, [12], vocab_size=V, eos=EOS,
                                beam_size=3, prefix=[SOS], stop="end_detect")[0]
    assert_same_nbest(ref_hyps, hyps)
    for h in hyps:
        steps = len(h.yseq) - 1 - (len(h.yseq) - 1 > 12)  # every token after sos was scored, bar a forced eos
        assert h.scores["length_bonus"] == steps
        assert h.score == pytest.approx(h.scores["decoder"] + bonus * steps, abs=1e-5)


@torch.no_grad()
def test_partial_scorer_sees_only_the_pre_beam(models):
    """A partial scorer (CTC) is asked only about the pre-beam of the key scorer; tokens outside it cannot win."""
    _, _, dec, ctc = models
    torch.manual_seed(14)
    enc = torch.randn(12, D)
    lengths = torch.tensor([12])
    seen = []

    class Spy(CTCScorer):
        def score(self, yseq, state, ids=None):
            seen.append(ids)
            return super().score(yseq, state, ids)

    scorers = {"decoder": DecoderScorer(dec, enc[None], lengths), "ctc": Spy(ctc.log_softmax(enc[None]), lengths, EOS)}
    weights = {"decoder": 0.7, "ctc": 0.3}
    hyps = weighted_beam_search(scorers, weights, [12], vocab_size=V, eos=EOS, beam_size=2, prefix=[SOS],
                                pre_beam_ratio=2.0, pre_beam_score_key="decoder")[0]
    first = dec.step(torch.tensor([[SOS]]), dec.init_cache(enc[None], lengths))[0][0]
    assert seen[0].shape == (2, 4)  # beam rows x int(2.0 * 2) candidates
    assert set(seen[0][0].tolist()) == set(first.topk(4).indices.tolist())  # the decoder's own 4 best
    assert hyps[0].tokens[0] in first.topk(4).indices.tolist()
    assert len(seen) > 1 and all(ids.shape[1] == 4 for ids in seen)


def test_attention_rescoring(models):
    ref_dec, _, dec, ctc = models
    torch.manual_seed(8)
    enc = torch.randn(14, D)
    lp = ctc.log_softmax(enc[None])[0]
    hyps = attention_rescoring(dec, enc, lp, sos=SOS, eos=EOS, beam_size=4, ctc_weight=0.3)
    nbest = ctc_prefix_beam_search(lp, 4)
    assert sorted((tuple(h.tokens), h.scores["ctc"]) for h in hyps) == sorted((tuple(t), s) for t, s in nbest)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    with torch.no_grad():
        for h in hyps:
            # reference decoder score: ESPnet's own one-step scorer over <sos> y, summing log p(y_i) and log p(eos)
            ys = [SOS] + h.tokens
            ref_att = sum(ref_dec.score(torch.tensor(ys[: i + 1]), None, enc)[0][t].item()
                          for i, t in enumerate(h.tokens + [EOS]))
            assert abs(h.scores["decoder"] - ref_att) < 1e-4
            assert abs(h.score - (ref_att + 0.3 * h.scores["ctc"])) < 1e-4
    assert len(hyps) == 4 and len(hyps[0].tokens) >= 2


class _IdentityEncoder(AbsEncoder):
    """Stands in for the speech encoder so ESPnetASRModel's loss composition can be run on given features."""

    def output_size(self) -> int:
        return D

    def forward(self, xs_pad, ilens, prev_states=None):
        return xs_pad, ilens, None


@pytest.mark.parametrize("ctc_weight", [0.3, 0.0, 1.0])
def test_hybrid_loss_matches_espnet_model(models, ctc_weight):
    ref_dec, ref_ctc, dec, ctc = models
    token_list = ["<blank>"] + [f"t{i}" for i in range(1, V - 1)] + ["<sos/eos>"]
    model = ESPnetASRModel(V, token_list, frontend=None, specaug=None, normalize=None, preencoder=None,
                           encoder=_IdentityEncoder(), postencoder=None, decoder=ref_dec, ctc=ref_ctc,
                           joint_network=None, ctc_weight=ctc_weight, lsm_weight=0.1, report_cer=False,
                           report_wer=False).eval()
    torch.manual_seed(9)
    enc = torch.randn(3, 13, D)
    enc_lengths = torch.tensor([13, 9, 12])
    ys = torch.randint(1, V - 1, (3, 6))
    ys_lengths = torch.tensor([6, 3, 5])
    ys_pad = ys.masked_fill(torch.arange(6)[None] >= ys_lengths[:, None], -1)
    with torch.no_grad():
        ref_loss, stats, _ = model(enc.clone(), enc_lengths, ys_pad.clone(), ys_lengths)
        loss, loss_ctc, loss_att = hybrid_loss(dec, ctc, enc, enc_lengths, ys, ys_lengths, sos=SOS, eos=EOS,
                                               ctc_weight=ctc_weight, lsm_weight=0.1)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    if ctc_weight > 0:
        assert abs(loss_ctc.item() - stats["loss_ctc"].item()) < 1e-5 * max(1.0, loss_ctc.item())
    if ctc_weight < 1:
        assert abs(loss_att.item() - stats["loss_att"].item()) < 1e-5 * max(1.0, loss_att.item())
    assert loss.item() > 1.0  # random weights: a real, non-zero loss was compared


def test_hybrid_loss_has_gradients(models):
    _, _, dec, ctc = models
    torch.manual_seed(10)
    enc = torch.randn(2, 10, D, requires_grad=True)
    loss, _, _ = hybrid_loss(dec, ctc, enc, torch.tensor([10, 8]), torch.randint(1, V - 1, (2, 4)),
                             torch.tensor([4, 2]), sos=SOS, eos=EOS)
    loss.backward()
    assert enc.grad[1, 8:].abs().max() == 0  # padded frames get no gradient
    assert enc.grad[0].abs().max() > 0 and dec.output_layer.weight.grad.abs().max() > 0


def test_search_input_errors(models):
    _, _, dec, ctc = models
    with pytest.raises(ValueError, match="needs ctc_log_probs"):
        beam_search(dec, torch.randn(5, D), None, sos=SOS, eos=EOS, ctc_weight=0.3)
    with pytest.raises(ValueError, match=r"enc must be \[T, D\]"):
        beam_search(dec, torch.randn(1, 5, D), None, sos=SOS, eos=EOS, ctc_weight=0.0)
