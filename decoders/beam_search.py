"""Joint CTC/attention decoding (Watanabe et al. 2017) and training loss of the hybrid ASR model.

Beam search follows ESPnet's `BatchBeamSearch` (the hypotheses of an utterance, here of a whole batch of
utterances, scored as one batch):

    score(h + c) = score(h) + (1 - ctc_weight) * log p_att(c | h, x)
                            + ctc_weight * [log psi_ctc(h + c) - log psi_ctc(h)]
                            + length_bonus

With CTC on (0 < ctc_weight < 1) only the int(pre_beam_ratio * beam) best tokens of the weighted decoder
score (+ length bonus) get a CTC prefix score (eos always does); the others cannot be chosen. Hypotheses
that emit eos leave the beam; search stops at maxlen, when the beam is empty, or (maxlenratio = 0) at
ESPnet's end detection. `attention_rescoring` is WeNet's second pass over a CTC prefix beam search n-best.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .asr_decoder import TransformerDecoder, add_sos_eos, label_smoothing_loss
from .ctc import CTC, CTCPrefixScorer, ctc_prefix_beam_search


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
    count = 0
    for m in range(M):
        same = [h.score for h in ended if len(h.yseq) == i - m]
        if same and max(same) - best < D_end:
            count += 1
    return count == M


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
def beam_search(decoder: TransformerDecoder | None, enc: torch.Tensor, ctc_log_probs: torch.Tensor | None,
                **opts) -> list[Hypothesis]:
    """Joint CTC/attention beam search of one utterance: enc [T, D], ctc_log_probs [T, V] (None when
    ctc_weight is 0). Options as `batch_beam_search`. Returns the ended hypotheses, best first."""
    if enc.dim() != 2:
        raise ValueError(f"enc must be [T, D] for one utterance, got {tuple(enc.shape)}")
    lp = None if ctc_log_probs is None else ctc_log_probs[None]
    return batch_beam_search(decoder, enc[None], torch.tensor([enc.shape[0]], device=enc.device), lp, **opts)[0]


@torch.no_grad()
def batch_beam_search(
    decoder: TransformerDecoder | None,
    enc: torch.Tensor,
    enc_lengths: torch.Tensor,
    ctc_log_probs: torch.Tensor | None,
    *,
    sos: int,
    eos: int,
    beam_size: int = 10,
    ctc_weight: float = 0.5,
    length_bonus: float = 0.0,
    maxlenratio: float = 0.0,
    minlenratio: float = 0.0,
    pre_beam_ratio: float = 1.5,
    prefix: list[int] | None = None,
    suppress: list[int] | None = None,
    prompt_in_maxlen: bool = False,
) -> list[list[Hypothesis]]:
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
    """
    use_ctc, use_dec = ctc_weight > 0, ctc_weight < 1
    if use_ctc and ctc_log_probs is None:
        raise ValueError(f"ctc_weight={ctc_weight} needs ctc_log_probs")
    if use_dec and decoder is None:
        raise ValueError(f"ctc_weight={ctc_weight} < 1 needs the attention decoder")
    if enc.dim() != 3:
        raise ValueError(f"enc must be [B, T, D], got {tuple(enc.shape)}")
    B, dev = enc.shape[0], enc.device
    V = decoder.cfg.vocab_size if use_dec else ctc_log_probs.shape[-1]
    prefix = [sos] if prefix is None else list(prefix)
    n_prompt = len(prefix) - 1 if prompt_in_maxlen or use_ctc else 0
    limits = [_max_min_len(int(n), maxlenratio, minlenratio, n_prompt) for n in enc_lengths.tolist()]
    maxlens = torch.tensor([m for m, _ in limits], device=dev)  # [B]
    pre_beam = int(pre_beam_ratio * beam_size)
    do_pre_beam = use_ctc and use_dec and pre_beam < V  # ESPnet: no pre-beam when CTC is the only scorer

    # running hypotheses of all utterances, grouped by utterance, best first within each
    utt = torch.arange(B, device=dev)  # [N]
    yseq = torch.tensor([prefix] * B, dtype=torch.long, device=dev)  # [N, len]
    score = torch.zeros(B, device=dev)
    used = [k for k, on in (("decoder", use_dec), ("ctc", use_ctc), ("length_bonus", length_bonus != 0)) if on]
    sums = {k: torch.zeros(B, device=dev) for k in used}  # unweighted score of each scorer
    cache = decoder.init_cache(enc, enc_lengths) if use_dec else None
    scorer = CTCPrefixScorer(ctc_log_probs, enc_lengths, eos) if use_ctc else None
    ctc_state = None
    if use_ctc:  # ESPnet counts the prefix after sos as emitted: the first token starts at frame len(prefix) - 1
        ctc_state = dataclasses.replace(scorer.init_state(utt), n_out=min(len(prefix) - 1, scorer.T - 1))
    banned = torch.tensor(sorted(set(suppress or [])), dtype=torch.long, device=dev)
    ended: list[list[Hypothesis]] = [[] for _ in range(B)]

    for i in range(max(m for m, _ in limits)):
        N = yseq.shape[0]
        weighted = torch.zeros(N, V, device=dev)
        parts = {}
        if use_dec:
            feed = yseq if cache.length == 0 else yseq[:, -1:]
            parts["decoder"], cache = decoder.step(feed, cache)  # [N, V]
            weighted += (1 - ctc_weight) * parts["decoder"].float()
        if length_bonus:
            weighted += length_bonus  # the length_bonus scorer gives 1 to every token
        if banned.numel():
            weighted[:, banned] = -math.inf
        if use_ctc:
            ids = torch.topk(weighted, pre_beam, dim=-1)[1] if do_pre_beam else None  # [N, pre_beam]
            parts["ctc"], scored = scorer.score(yseq[:, -1], ctc_state, ids)
            weighted += ctc_weight * parts["ctc"]
        weighted += score[:, None]

        # best beam_size extensions of each utterance's hypotheses
        prev = []
        for b in utt.unique_consecutive().tolist():
            rows = (utt == b).nonzero().squeeze(1)
            top = weighted[rows].view(-1).topk(min(beam_size, rows.numel() * V))[1]
            prev.append(rows[top // V] * V + top % V)
        flat = torch.cat(prev)
        prev, tok = flat // V, flat % V
        score = weighted.view(-1)[flat]
        sums = {k: v[prev] + (parts[k][prev, tok] if k in parts else 1.0) for k, v in sums.items()}
        yseq, utt = torch.cat([yseq[prev], tok[:, None]], dim=1), utt[prev]

        # hypotheses end on eos, or all of an utterance's at its last step (no eos score, as ESPnet)
        is_eos = (tok == eos) | (maxlens[utt] - 1 == i)
        for j in is_eos.nonzero().squeeze(1).tolist():
            b = int(utt[j])
            if i >= limits[b][1]:
                ys = yseq[j].tolist() + ([eos] if i == limits[b][0] - 1 else [])  # ESPnet appends even after eos
                tokens = ys[len(prefix):]
                while tokens and tokens[-1] == eos:
                    tokens.pop()
                ended[b].append(Hypothesis(tokens, ys, float(score[j]), {k: float(v[j]) for k, v in sums.items()}))
        alive = ~is_eos
        if maxlenratio == 0.0:
            for b in utt.unique_consecutive().tolist():
                if end_detect(ended[b], i):
                    alive &= utt != b
        keep = alive.nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        yseq, utt, score, prev, tok = yseq[keep], utt[keep], score[keep], prev[keep], tok[keep]
        sums = {k: v[keep] for k, v in sums.items()}
        if use_dec:
            cache = cache.select(prev)
        if use_ctc:
            ctc_state = scorer.select(scored, prev, tok)

    out = []
    for b in range(B):
        if not ended[b] and minlenratio >= 0.1:  # ESPnet retries with a smaller minimum length
            T_b = int(enc_lengths[b])
            lp = None if ctc_log_probs is None else ctc_log_probs[b, :T_b]
            ended[b] = beam_search(decoder, enc[b, :T_b], lp, sos=sos, eos=eos, beam_size=beam_size,
                                   ctc_weight=ctc_weight, length_bonus=length_bonus, maxlenratio=maxlenratio,
                                   minlenratio=max(0.0, minlenratio - 0.1), pre_beam_ratio=pre_beam_ratio,
                                   prefix=prefix, suppress=suppress, prompt_in_maxlen=prompt_in_maxlen)
        out.append(sorted(ended[b], key=lambda h: h.score, reverse=True))
    return out


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
