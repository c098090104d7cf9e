"""CTC (Graves et al. 2006) for the speech encoder: head, loss, greedy and prefix beam search, prefix
scoring for joint CTC/attention decoding, and Viterbi forced alignment for token timestamps.

Conventions follow ESPnet: blank id 0, the head is `ctc.ctc_lo` (Linear D -> V), the loss is torch's
builtin CTC loss (zero_infinity) summed over the batch and divided by the batch size.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGZERO = -1e10  # ESPnet's "log 0": finite so that sums and differences stay finite


class CTC(nn.Module):
    """CTC head: `ctc_lo` projects encoder output to vocabulary logits."""

    def __init__(self, vocab_size: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.ctc_lo = nn.Linear(d_model, vocab_size)

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        """Logits. enc [B, T, D] -> [B, T, V]."""
        return self.ctc_lo(F.dropout(enc, p=self.dropout, training=self.training))

    def log_softmax(self, enc: torch.Tensor) -> torch.Tensor:
        """Frame log-posteriors in float32. # [B, T, V]"""
        return torch.log_softmax(self.forward(enc).float(), dim=-1)

    def loss(self, enc: torch.Tensor, enc_lengths: torch.Tensor, ys: torch.Tensor,
             ys_lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss summed over utterances / batch size (ESPnet). ys [B, L] padded beyond ys_lengths."""
        logp = self.log_softmax(enc).transpose(0, 1)  # [T, B, V]
        targets = torch.cat([y[:n] for y, n in zip(ys, ys_lengths.tolist())])
        loss = F.ctc_loss(logp, targets, enc_lengths, ys_lengths, blank=0, reduction="none", zero_infinity=True)
        return (loss.sum() / enc.shape[0]).to(enc.dtype)


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks. log_probs [B, T, V]."""
    best = log_probs.argmax(-1)  # [B, T]
    out = []
    for b in range(best.shape[0]):
        path = best[b, : (int(lengths[b]) if lengths is not None else best.shape[1])]
        path = torch.unique_consecutive(path)
        out.append(path[path != blank].tolist())
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf or b == -math.inf:
        return max(a, b)
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(log_probs: torch.Tensor, beam_size: int, blank: int = 0) -> list[tuple[list[int], float]]:
    """CTC prefix beam search of one utterance (log_probs [T, V]); n-best (tokens, log P(prefix)) sorted.

    Each prefix keeps the log-probabilities of the paths ending in blank (pb) and non-blank (pnb); per frame only
    the `beam_size` most likely tokens are expanded, as in WeNet's `ctc_prefix_beam_search`.
    """
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [T, V] for one utterance, got {tuple(log_probs.shape)}")
    NEG = -math.inf
    hyps: dict[tuple, tuple[float, float]] = {(): (0.0, NEG)}
    top_lp, top_ids = log_probs.float().topk(min(beam_size, log_probs.shape[1]), dim=-1)
    for lps, ids in zip(top_lp.tolist(), top_ids.tolist()):
        nxt: dict[tuple, list[float]] = defaultdict(lambda: [NEG, NEG])
        for s, ps in zip(ids, lps):
            for prefix, (pb, pnb) in hyps.items():
                last = prefix[-1] if prefix else None
                if s == blank:
                    e = nxt[prefix]
                    e[0] = _logaddexp(e[0], _logaddexp(pb, pnb) + ps)
                elif s == last:
                    e = nxt[prefix]  # repeat without blank collapses
                    e[1] = _logaddexp(e[1], pnb + ps)
                    e = nxt[prefix + (s,)]  # repeat after blank is a new token
                    e[1] = _logaddexp(e[1], pb + ps)
                else:
                    e = nxt[prefix + (s,)]
                    e[1] = _logaddexp(e[1], _logaddexp(pb, pnb) + ps)
        alive = [kv for kv in nxt.items() if _logaddexp(*kv[1]) > NEG]  # a repeat right after pnb=-inf is impossible
        ranked = sorted(alive, key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_size]
        hyps = {k: (v[0], v[1]) for k, v in ranked}
    return [(list(k), _logaddexp(*v)) for k, v in hyps.items()]


@dataclass
class CTCPrefixState:
    """CTC state of N hypotheses: forward log-probs r [T, 2, N] of each prefix ending in a non-blank (0) or
    blank (1) at every frame, its prefix score log_psi [N], the utterance of each hypothesis utt [N], and the
    number of tokens emitted after the start token."""

    r: torch.Tensor
    log_psi: torch.Tensor
    utt: torch.Tensor
    n_out: int


@dataclass
class CTCPrefixScores:
    """Candidate states from one scoring step: r [T, 2, N, S], log_psi [N, V], scored ids [N, S] (None = all)."""

    r: torch.Tensor
    log_psi: torch.Tensor
    ids: torch.Tensor | None
    state: CTCPrefixState


class CTCPrefixScorer:
    """Vectorised CTC prefix scorer (Watanabe et al. 2017, Alg. 2; Seki et al. 2019), ESPnet's CTCPrefixScoreTH.

    score(h + c) = log psi(h + c) - log psi(h), where psi(g) is the probability of all CTC paths whose label
    sequence starts with g; for c = eos it is the probability of exactly h. No attention windowing.
    """

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, eos: int, blank: int = 0):
        B, T, V = log_probs.shape
        self.blank, self.eos, self.T, self.V = blank, eos, T, V
        lengths = torch.as_tensor(lengths, device=log_probs.device)
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"CTC lengths must lie in [1, {T}], got {lengths.tolist()}")
        # frames beyond an utterance emit blank with probability 1, so paths just idle there
        pad = ~(torch.arange(T, device=log_probs.device)[None, :] < lengths[:, None])  # [B, T]
        x = log_probs.float().masked_fill(pad[..., None], LOGZERO)  # float32: LOGZERO overflows half precision
        x[..., blank] = x[..., blank].masked_fill(pad, 0.0)
        self.x = x.transpose(0, 1).contiguous()  # [T, B, V]
        self.end_frames = lengths - 1  # [B]

    def init_state(self, utt: torch.Tensor) -> CTCPrefixState:
        """State of the start prefix for hypotheses of utterances `utt` [N]."""
        N = utt.shape[0]
        r = torch.full((self.T, 2, N), LOGZERO, dtype=self.x.dtype, device=self.x.device)
        r[:, 1] = torch.cumsum(self.x[:, utt, self.blank], dim=0)  # all-blank paths
        return CTCPrefixState(r, torch.zeros(N, dtype=self.x.dtype, device=self.x.device), utt, 0)

    def score(self, last: torch.Tensor, state: CTCPrefixState, ids: torch.Tensor | None = None):
        """Scores of appending each token (or only `ids` [N, S]) to the N hypotheses whose last token is `last` [N].

        Returns scores [N, V] (LOGZERO - log psi(h) outside `ids`) and a CTCPrefixScores for `select`.
        """
        r_prev, utt, n_out = state.r, state.utt, state.n_out
        N = r_prev.shape[2]
        x_c = self.x[:, utt] if ids is None else self.x[:, utt[:, None], ids]  # [T, N, S]
        x_b = self.x[:, utt, self.blank].unsqueeze(-1)  # [T, N, 1]
        cand = torch.arange(self.V, device=last.device)[None, :] if ids is None else ids  # [1 or N, S]
        S = x_c.shape[2]

        r_sum = torch.logsumexp(r_prev, dim=1)  # [T, N]
        # phi: probability of h ending at t-1 in a state that may be followed by c; c == last needs a blank between
        same = (cand == last[:, None]).unsqueeze(0)  # [1, N, S]
        log_phi = torch.where(same, r_prev[:, 1].unsqueeze(-1), r_sum.unsqueeze(-1))  # [T, N, S]

        r = torch.full((self.T, 2, N, S), LOGZERO, dtype=x_c.dtype, device=x_c.device)
        if n_out == 0:
            r[0, 0] = x_c[0]
        start = max(n_out, 1)
        for t in range(start, self.T):
            r[t, 0] = torch.logaddexp(r[t - 1, 0], log_phi[t - 1]) + x_c[t]
            r[t, 1] = torch.logaddexp(r[t - 1, 0], r[t - 1, 1]) + x_b[t]

        log_phi_x = torch.cat([log_phi[:1], log_phi[:-1]], dim=0) + x_c  # [T, N, S]
        psi = torch.logsumexp(torch.cat([log_phi_x[start:], r[start - 1, 0].unsqueeze(0)], dim=0), dim=0)  # [N, S]
        if ids is None:
            log_psi = psi
        else:
            log_psi = torch.full((N, self.V), LOGZERO, dtype=psi.dtype, device=psi.device).scatter(1, ids, psi)
        n_idx = torch.arange(N, device=r_sum.device)
        log_psi[:, self.eos] = r_sum[self.end_frames[utt], n_idx]
        if self.eos != self.blank:
            log_psi[:, self.blank] = LOGZERO
        return log_psi - state.log_psi[:, None], CTCPrefixScores(r, log_psi, ids, state)

    def select(self, scored: CTCPrefixScores, hyp: torch.Tensor, token: torch.Tensor) -> CTCPrefixState:
        """State of the extended hypotheses `hyp` [K] + `token` [K] after a `score` call."""
        if scored.ids is None:
            pos = token
        else:  # position of token among the scored ids (eos may not be there; its state is never used again)
            pos = (scored.ids[hyp] == token[:, None]).int().argmax(1)
        r = scored.r[:, :, hyp, pos]  # [T, 2, K]
        return CTCPrefixState(r, scored.log_psi[hyp, token], scored.state.utt[hyp], scored.state.n_out + 1)


@dataclass
class TokenSpan:
    """Frames [start, end) in which a target token is emitted on the best path; score = its mean posterior."""

    token: int
    start: int
    end: int
    score: float


def ctc_viterbi(log_probs: torch.Tensor, tokens: torch.Tensor, blank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely CTC path of `tokens` [L] through log_probs [T, V]: state index per frame [T] and its log-prob.

    States are the blank-interleaved target [blank, y1, blank, ..., yL, blank] (index 2k+1 = token k).
    """
    T, V = log_probs.shape
    L = tokens.shape[0]
    repeats = int((tokens[1:] == tokens[:-1]).sum()) if L > 1 else 0
    if T < L + repeats:
        raise ValueError(f"cannot align {L} tokens ({repeats} repeats) in {T} frames: need T >= L + repeats")
    if L and (int(tokens.min()) < 0 or int(tokens.max()) >= V or bool((tokens == blank).any())):
        raise ValueError(f"tokens must be non-blank ids in [0, {V}), got {tokens.tolist()}")
    dev = log_probs.device
    ext = torch.full((2 * L + 1,), blank, dtype=torch.long, device=dev)
    ext[1::2] = tokens
    S = ext.shape[0]
    skip_ok = torch.zeros(S, dtype=torch.bool, device=dev)  # s-2 -> s allowed between different tokens
    skip_ok[3::2] = ext[3::2] != ext[1:-2:2]
    lp = log_probs.float()[:, ext]  # [T, S]
    neg = torch.tensor(-math.inf, device=dev)
    alpha = torch.full((S,), -math.inf, device=dev)
    alpha[0] = lp[0, 0]
    if S > 1:
        alpha[1] = lp[0, 1]
    back = torch.zeros(T, S, dtype=torch.long, device=dev)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, T):
        a1 = torch.cat([neg[None], alpha[:-1]])
        a2 = torch.cat([neg.expand(2), alpha[:-2]]).masked_fill(~skip_ok, -math.inf)
        best, arg = torch.stack([alpha, a1, a2]).max(0)
        alpha = best + lp[t]
        back[t] = arg
    s = S - 1 if S == 1 or alpha[-1] >= alpha[-2] else S - 2
    if not torch.isfinite(alpha[s]):
        raise ValueError("no CTC path emits these tokens (all paths have zero probability)")
    states = torch.empty(T, dtype=torch.long)
    back = back.cpu()
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(back[t, s])
    return states.to(dev), lp.gather(1, states.to(dev)[:, None]).squeeze(1)


def ctc_forced_align(log_probs: torch.Tensor, tokens: torch.Tensor | list[int], blank: int = 0) -> list[TokenSpan]:
    """Frame span of every target token on the best CTC path (timestamps: frame * encoder frame shift).

    log_probs [T, V] of one utterance; tokens [L] without blanks. With 4x subsampling of 10 ms frames one
    encoder frame is 40 ms.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=log_probs.device)
    states, frame_lp = ctc_viterbi(log_probs, tokens, blank)
    spans = []
    for k in range(tokens.shape[0]):
        frames = (states == 2 * k + 1).nonzero().squeeze(1)
        start, end = int(frames[0]), int(frames[-1]) + 1
        spans.append(TokenSpan(int(tokens[k]), start, end, float(frame_lp[start:end].exp().mean())))
    return spans


def convert_espnet_ctc_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "ctc.") -> dict:
    """Select an ESPnet/Dolphin model's `ctc.ctc_lo.*` tensors and strip the prefix."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' keys in the state dict (first keys: {list(state_dict)[:5]})")
    return out
