"""Beam search with weighted scorers (ESPnet's BeamSearch(scorers, weights)), joint CTC/attention decoding
(Watanabe et al. 2017) and the training loss of the hybrid ASR model.

`weighted_beam_search` scores the hypotheses of a whole batch of utterances as one batch with the scorers of
`decoders.scorers` (attention decoder, Llama decoder, CTC prefix score, length bonus):

    score(h + c) = score(h) + sum_k weight_k * score_k(c | h)

`batch_beam_search` is ESPnet's joint CTC/attention search with it, as `BatchBeamSearch`:

    score(h + c) = score(h) + (1 - ctc_weight) * log p_att(c | h, x)
                            + ctc_weight * [log psi_ctc(h + c) - log psi_ctc(h)]
                            + length_bonus

With CTC on (0 < ctc_weight < 1) only the int(pre_beam_ratio * beam) best tokens of the weighted decoder
score (+ length bonus) get a CTC prefix score (eos always does); the others cannot be chosen. Hypotheses
that emit eos leave the beam; search stops at maxlen, when the beam is empty, or (maxlenratio = 0) at
ESPnet's end detection. `attention_rescoring` is WeNet's second pass over a CTC prefix beam search n-best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .asr_decoder import TransformerDecoder, add_sos_eos, label_smoothing_loss
from .ctc import CTC, ctc_prefix_beam_search
from .scorers import CTCScorer, DecoderScorer, LengthBonus


@dataclass
class Hypothesis:
    """A finished hypothesis: output tokens (no prefix, no final eos), the full sequence as ESPnet's yseq
    (prefix ... eos), the total weighted score and the unweighted per-scorer sums ("decoder", "ctc", "length_bonus")."""

    tokens: list[int]
    yseq: list[int]
    score: float
    scores: dict[str, float] = field(default_factory=dict)


def end_detect(ended: list[Hypothesis], i: int, M: int = 3, D_end: float = math.log(math.exp(-10))) -> bool:
    """ESPnet's end detection (Watanabe et al. 2017, eq. 50): the best ended hypotheses of each of the
    last M lengths are all far (D_end) below the best ended hypothesis overall."""
    if not ended:
        return False
    best = max(h.score for h in ended)
    ends = [[h.score for h in ended if len(h.yseq) == i - m] for m in range(M)]  # ended scores of the last M lengths
    return all(same and max(same) - best < D_end for same in ends)


def _max_min_len(T: int, maxlenratio: float, minlenratio: float, n_prompt: int = 0) -> tuple[int, int]:
    if maxlenratio == 0:
        maxlen = max(1, T - n_prompt)
    elif maxlenratio < 0:
        maxlen = -int(maxlenratio)
    else:
        maxlen = max(1, int(maxlenratio * T))
    minlen = -int(minlenratio) if minlenratio < 0 else int(minlenratio * T)
    return maxlen, minlen


@torch.no_grad()
def weighted_beam_search(scorers: dict, weights: dict[str, float], maxlens: list[int], *, vocab_size: int, eos: int,
                         beam_size: int, device: torch.device | str | None = None, prefix: list[int] = (),
                         minlens: list[int] | None = None, pre_beam_ratio: float = 1.5,
                         pre_beam_score_key: str | None = "full", suppress: list[int] | None = None,
                         stop: str | None = None, eos_at_maxlen: bool = True) -> list[list[Hypothesis]]:
    """Beam search of len(maxlens) utterances with scorers (`decoders.scorers`), as ESPnet's BeamSearch(scorers,
    weights): score(h + c) = score(h) + sum_k weights[k] * scorers[k](c | h). Each utterance has beam_size rows
    (rows without a hypothesis score -inf); all rows are scored as one batch; an utterance that stops leaves it.

    maxlens / minlens: per utterance, the most tokens (the running hypotheses then end, yseq + [eos] when
    eos_at_maxlen, as ESPnet) and the fewest (an earlier eos hypothesis is dropped). pre_beam_score_key: "full"
    (the weighted sum of the full scorers), a scorer's name, or None: the partial scorers score only the
    int(pre_beam_ratio * beam_size) best tokens of it. suppress: tokens never chosen. stop: when an utterance
    stops before its maxlen: "end_detect" (ESPnet's), "best_ended" (its best ended hypothesis beats every running
    one: exact for the best when no score is positive), None (when none runs). Returns each utterance's ended
    hypotheses, best first; their scores hold each scorer's unweighted sum.
    """
    B, K, V = len(maxlens), beam_size, vocab_size
    if not 1 <= K <= V:
        raise ValueError(f"beam_size must lie in [1, vocab_size={V}], got {K}")
    prefix, minlens = list(prefix), minlens or [0] * B
    utt = torch.arange(B, device=device).repeat_interleave(K)  # [N]: rows b*K .. b*K+K-1 hold utterance b
    yseq = torch.tensor([prefix] * (B * K), dtype=torch.long, device=device).view(B * K, len(prefix))
    score = torch.tensor([0.0] + [-math.inf] * (K - 1), device=device).repeat(B)  # at first one hypothesis each
    states = {k: s.init_state(utt, prefix) for k, s in scorers.items()}
    sums = {k: torch.zeros(B * K, device=device) for k in scorers}
    pre_beam = int(pre_beam_ratio * K)
    if pre_beam >= V or not any(s.partial for s in scorers.values()):  # ESPnet: no pre-beam then
        pre_beam_score_key = None
    banned = torch.tensor(sorted(set(suppress or [])), dtype=torch.long, device=device)
    maxlen_of = torch.tensor(maxlens, device=device)
    ended: list[list[Hypothesis]] = [[] for _ in range(B)]

    for i in range(max(maxlens)):
        weighted, parts, scored = _score_all(scorers, weights, states, yseq, V, banned, pre_beam_score_key, pre_beam)
        weighted += score[:, None]
        prev, tok, score = _best(weighted, score, K)
        sums = {k: v[prev] + parts[k][prev, tok] for k, v in sums.items()}
        yseq = torch.cat([yseq[prev], tok[:, None]], dim=1)

        # hypotheses end on eos, or all of an utterance's at its last step (no eos score, as ESPnet)
        finishing = torch.isfinite(score) & ((tok == eos) | (maxlen_of[utt] - 1 == i))
        for j in finishing.nonzero().squeeze(1).tolist():
            b = int(utt[j])
            if i >= minlens[b]:
                ys = yseq[j].tolist() + ([eos] if eos_at_maxlen and i == maxlens[b] - 1 else [])
                tokens = ys[len(prefix):]
                while tokens and tokens[-1] == eos:
                    tokens.pop()
                ended[b].append(Hypothesis(tokens, ys, float(score[j]), {k: float(v[j]) for k, v in sums.items()}))
        score = score.masked_fill(finishing, -math.inf)
        keep = _running(score, utt, ended, i, K, stop)
        if keep is None:
            break
        if keep.numel() < utt.numel():
            yseq, utt, score, prev, tok = yseq[keep], utt[keep], score[keep], prev[keep], tok[keep]
            sums = {k: v[keep] for k, v in sums.items()}
        states = {k: s.select(scored[k], prev, tok) for k, s in scorers.items()}
    return [sorted(h, key=lambda h: h.score, reverse=True) for h in ended]


def _best(weighted: torch.Tensor, score: torch.Tensor, K: int):
    """The best K extensions (prev row [N'], token [N'], score [N']) of each utterance's running hypotheses of
    weighted [N, V], K rows per utterance: as ESPnet, a top-k over the running rows only (so ties go as its do)."""
    V = weighted.shape[1]
    running = torch.isfinite(score).view(-1, K)
    flat = []
    for r in range(running.shape[0]):
        rows = r * K + running[r].nonzero().squeeze(1)
        top = weighted[rows].view(-1).topk(K)[1]
        flat.append(rows[top // V] * V + top % V)
    flat = torch.cat(flat)
    return flat // V, flat % V, weighted.view(-1)[flat]


def _score_all(scorers: dict, weights: dict, states: dict, yseq: torch.Tensor, V: int, banned: torch.Tensor,
               pre_beam_score_key: str | None, pre_beam: int):
    """Weighted scores [N, V] of every extension (the full scorers first; suppressed tokens -inf; the partial ones
    on the pre-beam), each scorer's own scores [N, V], and what each scorer selects its next states from."""
    weighted = torch.zeros(yseq.shape[0], V, device=yseq.device)
    parts, scored = {}, {}
    for partial in (False, True):
        ids = None
        if partial and pre_beam_score_key is not None:
            key = weighted if pre_beam_score_key == "full" else parts[pre_beam_score_key]
            ids = torch.topk(key, pre_beam, dim=-1)[1]  # [N, pre_beam]
        for k, s in scorers.items():
            if s.partial == partial:
                parts[k], scored[k] = s.score(yseq, states[k], ids)
                weighted += weights[k] * parts[k]
        if not partial and banned.numel():
            weighted[:, banned] = -math.inf
    return weighted, parts, scored


def _running(score: torch.Tensor, utt: torch.Tensor, ended: list[list[Hypothesis]], i: int, K: int,
             stop: str | None) -> torch.Tensor | None:
    """Rows [N'] of the utterances that go on searching after step i (K per utterance), None when none does."""
    best = score.view(-1, K).max(1).values.tolist()  # best running hypothesis of each utterance
    keep = []
    for r, b in enumerate(utt[::K].tolist()):
        done = best[r] == -math.inf
        if stop == "end_detect":
            done = done or end_detect(ended[b], i)
        elif stop == "best_ended":
            done = done or bool(ended[b]) and max(h.score for h in ended[b]) >= best[r]
        if not done:
            keep.append(r)
    if not keep:
        return None
    return (torch.tensor(keep, device=score.device)[:, None] * K + torch.arange(K, device=score.device)).view(-1)


def joint_scorers(name: str, make_decoder, ctc_log_probs: torch.Tensor | None, ctc_lengths: torch.Tensor | None,
                  eos: int, ctc_weight: float, length_bonus: float, V: int, lexicon=None,
                  lexicon_weight: float = 0.0) -> tuple[dict, dict]:
    """Scorers and weights of joint CTC/attention decoding: the decoder's (`name`, made by make_decoder())
    1 - ctc_weight, "ctc" ctc_weight, "length_bonus" length_bonus, "lexicon" (a `decoders.lexicon.LexiconScorer`,
    ESPnet's word LM) lexicon_weight; those of weight 0 are left out."""
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must lie in [0, 1], got {ctc_weight}")
    if ctc_weight > 0 and (ctc_log_probs is None or ctc_lengths is None):
        raise ValueError(f"ctc_weight={ctc_weight} needs ctc_log_probs and their lengths")
    scorers = {name: make_decoder()} if ctc_weight < 1 else {}
    if ctc_weight > 0:
        scorers["ctc"] = CTCScorer(ctc_log_probs, ctc_lengths, eos)
    if length_bonus:
        scorers["length_bonus"] = LengthBonus(V)
    if lexicon is not None and lexicon_weight:
        scorers["lexicon"] = lexicon
    weights = {name: 1 - ctc_weight, "ctc": ctc_weight, "length_bonus": length_bonus, "lexicon": lexicon_weight}
    return scorers, {k: weights[k] for k in scorers}


@torch.no_grad()
def beam_search(decoder: TransformerDecoder | None, enc: torch.Tensor, ctc_log_probs: torch.Tensor | None,
                **opts) -> list[Hypothesis]:
    """Joint CTC/attention beam search of one utterance: enc [T, D], ctc_log_probs [T, V] (None when
    ctc_weight is 0). Options as `batch_beam_search`. Returns the ended hypotheses, best first."""
    if enc.dim() != 2:
        raise ValueError(f"enc must be [T, D] for one utterance, got {tuple(enc.shape)}")
    lp = None if ctc_log_probs is None else ctc_log_probs[None]
    return batch_beam_search(decoder, enc[None], torch.tensor([enc.shape[0]], device=enc.device), lp, **opts)[0]


@torch.no_grad()
def batch_beam_search(decoder: TransformerDecoder | None, enc: torch.Tensor, enc_lengths: torch.Tensor,
                      ctc_log_probs: torch.Tensor | None, *, sos: int, eos: int, beam_size: int = 10,
                      ctc_weight: float = 0.5, length_bonus: float = 0.0, maxlenratio: float = 0.0,
                      minlenratio: float = 0.0, pre_beam_ratio: float = 1.5, prefix: list[int] | None = None,
                      suppress: list[int] | None = None, prompt_in_maxlen: bool = False, lexicon=None,
                      lexicon_weight: float = 0.0) -> list[list[Hypothesis]]:
    """Joint CTC/attention beam search of a padded batch enc [B, T, D], ctc_log_probs [B, T, V]; every utterance
    gets the n-best ESPnet would give it alone, but the hypotheses of all utterances are scored together.

    ctc_weight: 0 -> attention only, 1 -> CTC only. maxlenratio: 0 -> max length T_b with end detection;
    < 0 -> constant max length; > 0 -> ratio * T_b. minlenratio: < 0 -> constant, else ratio * T_b.
    prefix: start tokens (default [sos], e.g. Dolphin's <sos><lang><region><asr><notimestamp>); as ESPnet's CTC
    scorer with a hyp_primer, the CTC score counts the tokens after it, the first from frame len(prefix) - 1 on.
    prompt_in_maxlen (always with CTC): with maxlenratio 0 the prompt after sos takes len(prefix) - 1 of the T_b
    positions, so the search stops at T_b + 1 - len(prefix) tokens, as Dolphin's (T' - 4 with its 5-token prompt);
    a CTC prefix scorer that starts at frame len(prefix) - 1 has no frames for more (ESPnet's CTCPrefixScoreTH
    fails there with an IndexError).
    suppress: token ids that can never be chosen (-inf before the pre-beam, as ESPnet S2T's ScoreFilter does to
    the time tokens after <notimestamps>).
    lexicon: a `decoders.lexicon.LexiconScorer` (a word list's look-ahead unigram) weighted by lexicon_weight, or None.
    """
    use_ctc, use_dec = ctc_weight > 0, ctc_weight < 1
    if use_dec and decoder is None:
        raise ValueError(f"ctc_weight={ctc_weight} < 1 needs the attention decoder")
    if enc.dim() != 3:
        raise ValueError(f"enc must be [B, T, D], got {tuple(enc.shape)}")
    V = decoder.cfg.vocab_size if use_dec else None if ctc_log_probs is None else ctc_log_probs.shape[-1]
    prefix = [sos] if prefix is None else list(prefix)
    n_prompt = len(prefix) - 1 if prompt_in_maxlen or use_ctc else 0
    limits = [_max_min_len(int(n), maxlenratio, minlenratio, n_prompt) for n in enc_lengths.tolist()]
    scorers, weights = joint_scorers("decoder", lambda: DecoderScorer(decoder, enc, enc_lengths), ctc_log_probs,
                                     enc_lengths, eos, ctc_weight, length_bonus, V, lexicon, lexicon_weight)
    ended = weighted_beam_search(scorers, weights, [m for m, _ in limits], minlens=[m for _, m in limits],
                                 vocab_size=V, eos=eos, beam_size=beam_size, device=enc.device, prefix=prefix,
                                 pre_beam_ratio=pre_beam_ratio, pre_beam_score_key="full" if use_dec else None,
                                 suppress=suppress, stop="end_detect" if maxlenratio == 0 else None)
    for b in range(enc.shape[0]):
        if not ended[b] and minlenratio >= 0.1:  # ESPnet retries with a smaller minimum length
            T_b = int(enc_lengths[b])
            lp = None if ctc_log_probs is None else ctc_log_probs[b, :T_b]
            ended[b] = beam_search(decoder, enc[b, :T_b], lp, sos=sos, eos=eos, beam_size=beam_size,
                                   ctc_weight=ctc_weight, length_bonus=length_bonus, maxlenratio=maxlenratio,
                                   minlenratio=max(0.0, minlenratio - 0.1), pre_beam_ratio=pre_beam_ratio,
                                   prefix=prefix, suppress=suppress, prompt_in_maxlen=prompt_in_maxlen,
                                   lexicon=lexicon, lexicon_weight=lexicon_weight)
    return ended


@torch.no_grad()
def attention_rescoring(decoder: TransformerDecoder, enc: torch.Tensor, ctc_log_probs: torch.Tensor, *,
                        sos: int, eos: int, beam_size: int = 10, ctc_weight: float = 0.5,
                        prefix: list[int] | None = None) -> list[Hypothesis]:
    """WeNet's attention rescoring of one utterance (enc [T, D], ctc_log_probs [T, V]).

    The CTC prefix beam search n-best is re-scored by the decoder with teacher forcing:
        score = sum_i log p_att(y_i | prefix, y_<i, x) + log p_att(eos | prefix, y, x) + ctc_weight * log P_ctc(y)
    Returns the n-best sorted by that score; scores holds "decoder" and "ctc".
    """
    nbest = ctc_prefix_beam_search(ctc_log_probs, beam_size)
    prefix = [sos] if prefix is None else list(prefix)
    P, N = len(prefix), len(nbest)
    L = P + max(len(t) for t, _ in nbest)
    ys_in = torch.full((N, L), eos, dtype=torch.long, device=enc.device)
    ys_out = torch.full((N, L), -1, dtype=torch.long, device=enc.device)  # targets, -1 = not scored
    for n, (toks, _) in enumerate(nbest):
        ys_in[n, : P + len(toks)] = torch.tensor(prefix + toks)
        ys_out[n, P - 1: P + len(toks)] = torch.tensor(toks + [eos])
    # positions before the last prefix token predict nothing, but still have to be attended by later ones
    lens = torch.tensor([P + len(t) for t, _ in nbest], device=enc.device)
    logits = decoder(enc[None].expand(N, -1, -1), torch.full((N,), enc.shape[0], device=enc.device), ys_in, lens)
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, ys_out.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ys_out < 0, 0.0)
    att = lp.sum(1).tolist()
    hyps = [Hypothesis(toks, prefix + toks + [eos], a + ctc_weight * c, {"decoder": a, "ctc": c})
            for (toks, c), a in zip(nbest, att)]
    return sorted(hyps, key=lambda h: h.score, reverse=True)


def hybrid_loss(decoder: TransformerDecoder, ctc: CTC, enc: torch.Tensor, enc_lengths: torch.Tensor,
                ys: torch.Tensor, ys_lengths: torch.Tensor, *, sos: int, eos: int, ctc_weight: float = 0.3,
                lsm_weight: float = 0.1, ignore_id: int = -1, length_normalized_loss: bool = False):
    """ESPnet hybrid CTC/attention loss: ctc_weight * L_ctc + (1 - ctc_weight) * L_att.

    L_att is the label-smoothed (lsm_weight) loss of the decoder on `<sos> y` -> `y <eos>`, summed and divided by
    the batch size (or the token count with length_normalized_loss). Returns (loss, loss_ctc, loss_att);
    a part with weight 0 is not computed (None).
    """
    loss_ctc = loss_att = None
    if ctc_weight > 0:
        loss_ctc = ctc.loss(enc, enc_lengths, ys, ys_lengths)
    if ctc_weight < 1:
        ys_in, ys_out, ys_in_lengths = add_sos_eos(ys, ys_lengths, sos, eos, ignore_id)
        logits = decoder(enc, enc_lengths, ys_in, ys_in_lengths)
        loss_att = label_smoothing_loss(logits, ys_out, lsm_weight, ignore_id, length_normalized_loss)
    if loss_ctc is None:
        return loss_att, None, loss_att
    if loss_att is None:
        return loss_ctc, loss_ctc, None
    return ctc_weight * loss_ctc + (1 - ctc_weight) * loss_att, loss_ctc, loss_att
