"""Scorers for `decoders.beam_search.weighted_beam_search` (ESPnet's batched scorer interface, made small).

A scorer scores every next token of N hypotheses at once and keeps a state per hypothesis:
    init_state(utt [N], prefix) -> state: hypotheses of the utterances utt, each the tokens `prefix` so far
    score(yseq [N, L], state, ids) -> (scores [N, V], scored): a `partial` scorer (ESPnet's PartialScorer) gets
        the pre-beam ids [N, S] (or None: all) and scores only those; the others get None
    select(scored, prev [N'], tok [N']) -> state of the hypotheses prev extended by the tokens tok
"""
from __future__ import annotations

import dataclasses

import torch

from .asr_decoder import TransformerDecoder
from .ctc import CTCPrefixScorer
from .llama import LlamaForCausalLM


class DecoderScorer:
    """ESPnet's attention decoder on encoder output enc [B, T, D]: log p_att(c | prefix, h, x)."""

    partial = False

    def __init__(self, decoder: TransformerDecoder, enc: torch.Tensor, enc_lengths: torch.Tensor):
        self.decoder, self.enc, self.enc_lengths = decoder, enc, enc_lengths

    def init_state(self, utt, prefix):
        return self.decoder.init_cache(self.enc, self.enc_lengths).select(utt)

    def score(self, yseq, cache, ids=None):
        logp, cache = self.decoder.step(yseq if cache.length == 0 else yseq[:, -1:], cache)  # the prefix first
        return logp.float(), cache

    def select(self, cache, prev, tok):
        return cache.select(prev)


class LlamaScorer:
    """The Llama decoder after prompts of embeddings inputs_embeds [B, T, D] (left-padded: attention_mask [B, T]):
    log p_llm(c | prompt, h). The prompts are prefilled once into a static KV cache of T + max_new_tokens slots,
    then each step feeds the last tokens. State: (cache, key_mask [N, slots], the prefill's log-probs or None)."""

    partial = False

    def __init__(self, llm: LlamaForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int):
        self.llm, self.embeds, self.mask, self.max_new = llm, inputs_embeds, attention_mask, max_new_tokens

    def init_state(self, utt, prefix):
        B, T, _ = self.embeds.shape
        key_mask = torch.ones(B, T + self.max_new, dtype=torch.bool, device=self.embeds.device)  # slots attended
        if self.mask is not None:
            key_mask[:, :T] = self.mask.to(key_mask.device).bool()
        cache = self.llm.new_kv_cache(B, T + self.max_new)
        logits = self.llm(None, key_mask[:, :T], inputs_embeds=self.embeds, kv_cache=cache, last_only=True)  # [B, 1, V]
        cache.reorder(utt)
        return cache, key_mask[utt], torch.log_softmax(logits[utt, -1].float(), dim=-1)

    def score(self, yseq, state, ids=None):
        cache, key_mask, prefilled = state
        if prefilled is None:
            logits = self.llm(yseq[:, -1:], key_mask[:, : cache.length + 1], kv_cache=cache)  # [N, 1, V]
            prefilled = torch.log_softmax(logits[:, -1].float(), dim=-1)
        return prefilled, (cache, key_mask)

    def select(self, state, prev, tok):
        state[0].reorder(prev)
        return state[0], state[1][prev], None


class CTCScorer:
    """CTC prefix score log psi(h + c) - log psi(h) (`decoders.ctc.CTCPrefixScorer`) of log_probs [B, T, V] with
    lengths [B]. As ESPnet's CTC scorer with a hyp_primer, the prefix after its first token (sos) counts as
    emitted: the first new token starts at frame len(prefix) - 1."""

    partial = True

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, eos: int, blank: int = 0):
        self.ctc = CTCPrefixScorer(log_probs, lengths, eos, blank)

    def init_state(self, utt, prefix):
        return dataclasses.replace(self.ctc.init_state(utt), n_out=min(max(len(prefix) - 1, 0), self.ctc.T - 1))

    def score(self, yseq, state, ids=None):
        last = yseq[:, -1] if yseq.shape[1] else yseq.new_full((yseq.shape[0],), -1)  # -1: no token yet
        return self.ctc.score(last, state, ids)

    def select(self, scored, prev, tok):
        return self.ctc.select(scored, prev, tok)


class LengthBonus:
    """1 for every token (ESPnet's LengthBonus): its weight is the bonus per output token."""

    partial = False

    def __init__(self, vocab_size: int):
        self.V = vocab_size

    def init_state(self, utt, prefix):
        return None

    def score(self, yseq, state, ids=None):
        return torch.ones(1, device=yseq.device).expand(yseq.shape[0], self.V), None

    def select(self, state, prev, tok):
        return None
