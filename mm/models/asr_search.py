"""Decoding a padded batch of utterances with the ASR model: the Dolphin/OWSM prompt (language and region detected
or given) and the four searches, as `ASRSearch`, the part of `mm.models.asr.ASRModel` that turns encoder states into
Segments.

Searches. "ctc": greedy CTC; "attention": the decoder's beam search; "joint": the CTC/attention beam search of
ESPnet (ctc_weight 0.5 by default, as its Speech2Text); "rescore": the CTC prefix beam's n-best rescored by the
decoder (Dolphin's attention_rescoring; ctc_weight from the training config, 0 for prompt models as Dolphin's).
With a word lexicon (`decoders.lexicon`) "ctc" becomes a CTC prefix beam search, and "ctc", "attention" and "joint"
add its look-ahead unigram, weighted, on the pre-beam (a partial scorer at Dolphin's 40k tokens).

Dolphin / OWSM prompts. When the token list has `<asr>` and language tokens (the blocks of s2t_tokens: Dolphin's
138 languages <ab>..<zu> and 179 regions <AD>..<ZA>), the decoder is primed with
`<sos><lang>[<region>]<asr>[<notimestamp>]` (<notimestamp>, or OWSM's <notimestamps>, whichever the list has: our
timestamps come from CTC, never from time tokens), and while searching, the time tokens <0.00>..<30.00> are
forbidden as ESPnet S2T's ScoreFilter forbids them after <notimestamp(s)>. Unless `language` is given, language and
region are detected per window as Dolphin's DolphinSpeech2Text.detect_language does: the argmax of the decoder's
log-probabilities after `<sos>` over the language block, then after `<sos><lang>` over the region block; a given
language skips the first step; a region can only be given with its language. In joint decoding the CTC prefix
scorer, as ESPnet's with a hyp_primer, lets the first token start at frame len(prompt) - 1, and the search stops
at T' + 1 - len(prompt) tokens (T' - 4 with Dolphin's prompt), as Dolphin's. The text leaves out every `<...>`
token, as ESPnet S2T's text_nospecial (what Dolphin returns); `tokens` / `token_ids` keep them.
"""
from __future__ import annotations

import torch

from decoders.beam_search import attention_rescoring, batch_beam_search
from decoders.ctc import ctc_forced_align, ctc_greedy_decode
from decoders.lexicon import LEXICON_WEIGHT, LexiconScorer, as_lexicon
from mm.models.s2t_tokens import token_id
from mm.models.transcript import Segment, Word

DECODE_MODES = ("ctc", "attention", "joint", "rescore")
ESPNET_JOINT_CTC_WEIGHT = 0.5  # Speech2Text's default ctc_weight


class ASRSearch:
    """`detect_language`, `decode_batch` and their helpers (needs the ASRModel's config, decoder, s2t tokens)."""

    @torch.no_grad()
    def detect_language(self, enc: torch.Tensor, enc_lengths: torch.Tensor) -> list[tuple[int, int | None]]:
        """Dolphin's detection per utterance: argmax of the decoder's log-probs after <sos> over the language
        tokens, then after <sos><lang> over the region tokens (None when there are none). enc [B, T', d]."""
        if not self.has_prompt:
            raise ValueError("this model has no language tokens / <asr> prompt to detect a language with")
        B = enc.shape[0]
        cache = self.decoder.init_cache(enc, enc_lengths)
        sos = torch.full((B, 1), self.config.sos, dtype=torch.long, device=enc.device)
        logp, cache = self.decoder.step(sos, cache)  # [B, V]
        lang_ids = torch.tensor(self.language_ids, device=enc.device)
        lang = lang_ids[logp[:, lang_ids].argmax(-1)]  # [B]
        if not self.region_ids:
            return [(int(x), None) for x in lang]
        logp, _ = self.decoder.step(lang[:, None], cache)
        region_ids = torch.tensor(self.region_ids, device=enc.device)
        region = region_ids[logp[:, region_ids].argmax(-1)]
        return [(int(a), int(b)) for a, b in zip(lang, region)]

    def _prefixes(self, enc, enc_lengths, language: str | None, region: str | None):
        """Decoder prefix per utterance and its (language, region) ids."""
        B, sos = enc.shape[0], self.config.sos
        if not self.has_prompt:
            if language is not None or region is not None:
                raise ValueError("this model has no language/region tokens; language= and region= cannot be used")
            return [[sos]] * B, [(None, None)] * B
        tl = self.config.token_list
        if region is not None and language is None:
            raise ValueError(f"region={region!r} needs its language= too (a region is read after its language)")
        lang_id = None if language is None else token_id(tl, language, "language", self.s2t.languages)
        region_id = None
        if region is not None:
            region_id = token_id(tl, region, "region", self.s2t.regions)
        if lang_id is None:  # detect the language and the region after it
            ids = self.detect_language(enc, enc_lengths)
        elif region_id is None and self.region_ids:  # the language is given: detect only the region after it
            cache = self.decoder.init_cache(enc, enc_lengths)
            logp, _ = self.decoder.step(torch.tensor([[sos, lang_id]] * B, device=enc.device), cache)
            rid = torch.tensor(self.region_ids, device=enc.device)
            ids = [(lang_id, int(r)) for r in rid[logp[:, rid].argmax(-1)]]
        else:
            ids = [(lang_id, region_id)] * B
        tail = self.s2t.prompt_tail()
        prefixes = [[sos, l] + ([r] if r is not None else []) + tail for l, r in ids]
        return prefixes, ids

    @torch.no_grad()
    def decode_batch(self, waves: list[torch.Tensor], decode: str | None = None, beam: int = 10,
                     ctc_weight: float | None = None, timestamps: bool = False, language: str | None = None,
                     region: str | None = None, offsets: list[float] | None = None,
                     lexicon: LexiconScorer | None = None, lexicon_weight: float = LEXICON_WEIGHT) -> list[Segment]:
        """Decode 16 kHz waveforms (each [S] >= min_samples) as one padded batch; one Segment per waveform.
        lexicon: `lexicon_scorer`'s scorer of a word list, or None."""
        decode, ctc_weight = self._decode_options(decode, ctc_weight, lexicon)
        offsets = offsets or [0.0] * len(waves)
        dev = self.device
        lengths = torch.tensor([w.numel() for w in waves], device=dev)
        batch = torch.nn.utils.rnn.pad_sequence([w.to(dev) for w in waves], batch_first=True)  # [B, S], zeros after
        enc, enc_lengths = self.encode(batch, lengths)  # [B, T', d]
        log_probs = self.ctc_log_probs(enc)  # [B, T', V]
        # the prompt (and language detection) even for CTC decoding, which reports the language too
        prefixes, lang_region = self._prefixes(enc, enc_lengths, language, region)
        hyps = self._search(decode, beam, ctc_weight, enc, enc_lengths, log_probs, prefixes, lexicon, lexicon_weight)
        c = self.config
        segments = []
        for b, ids in enumerate(hyps):
            ids = [i for i in ids if i != c.blank]  # ESPnet drops blanks from attention outputs too
            T = int(enc_lengths[b])
            start, end = offsets[b], offsets[b] + waves[b].numel() / c.speech.frontend.sample_rate
            words = self._align(log_probs[b, :T], ids, offsets[b]) if timestamps else []
            if words:
                start, end = words[0].start, words[-1].end
            lang, reg = lang_region[b]
            segments.append(Segment(
                start=round(start, 3), end=round(end, 3), text=self.tokens_to_text(ids),
                tokens=[c.token_list[i] for i in ids], token_ids=ids, words=words,
                language=None if lang is None else c.token_list[lang][1:-1],
                region=None if reg is None else c.token_list[reg][1:-1],
            ))
        return segments

    def _search(self, decode: str, beam: int, ctc_weight: float, enc: torch.Tensor, enc_lengths: torch.Tensor,
                log_probs: torch.Tensor, prefixes: list[list[int]], lexicon: LexiconScorer | None = None,
                lexicon_weight: float = LEXICON_WEIGHT) -> list[list[int]]:
        """The best token ids per utterance; enc [B, T', d], log_probs [B, T', V], prefixes from _prefixes."""
        c = self.config
        if decode == "ctc" and lexicon is None:
            return [[i for i in ids if i not in (c.sos, c.eos)] for ids in ctc_greedy_decode(log_probs, enc_lengths)]
        if decode == "rescore":
            hyps = []
            for b, prefix in enumerate(prefixes):
                T = int(enc_lengths[b])
                best = attention_rescoring(self.decoder, enc[b, :T], log_probs[b, :T], sos=c.sos, eos=c.eos,
                                           beam_size=beam, ctc_weight=ctc_weight, prefix=prefix)
                hyps.append(best[0].tokens)
            return hyps
        hyps = [None] * len(prefixes)
        groups: dict[tuple, list[int]] = {}
        for b, p in enumerate(prefixes):  # utterances with the same prompt are searched together
            groups.setdefault(tuple(p), []).append(b)
        for prefix, idx in groups.items():
            sel = torch.tensor(idx, device=enc.device)
            lp = log_probs[sel] if ctc_weight > 0 else None
            nbest = batch_beam_search(self.decoder, enc[sel], enc_lengths[sel], lp, sos=c.sos, eos=c.eos,
                                      beam_size=beam, ctc_weight=ctc_weight, prefix=list(prefix),
                                      suppress=self.s2t.suppressed(list(prefix)), prompt_in_maxlen=True,
                                      lexicon=lexicon, lexicon_weight=lexicon_weight)
            for b, n in zip(idx, nbest):
                hyps[b] = n[0].tokens if n else []
        return hyps

    def lexicon_scorer(self, words) -> LexiconScorer | None:
        """The `decoders.lexicon.LexiconScorer` of `words` (a Lexicon, a word-list file or a list of words; None: none)
        over this model's token list; a character model (token_type char) has no word pieces to spell with."""
        if words is None:
            return None
        if self.config.token_type != "bpe":
            raise ValueError(f"a word lexicon needs a model of word pieces (token_type bpe); this one is "
                             f"{self.config.token_type!r}")
        return LexiconScorer(as_lexicon(words), list(self.config.token_list), self.config.eos)

    def _align(self, log_probs: torch.Tensor, ids: list[int], offset: float) -> list[Word]:
        """Words with times from a CTC forced alignment of ids on log_probs [T', V]; [] when none fits."""
        if not ids:
            return []
        try:
            spans = ctc_forced_align(log_probs, ids, blank=self.config.blank)
        except ValueError:  # more tokens than frames allow (an attention hypothesis CTC cannot emit)
            return []
        return self._words(ids, spans, offset)

    def _decode_options(self, decode: str | None, ctc_weight: float | None, lexicon=None) -> tuple[str, float]:
        """(decode, ctc_weight) with their defaults, checked against the model (CTC only, prompt model) and a lexicon
        (only in the beam searches)."""
        if decode is None:
            decode = "joint" if self.decoder is not None else "ctc"
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode != "ctc" and self.decoder is None:
            raise ValueError(f"decode={decode!r} needs an attention decoder; this model is CTC only (use 'ctc')")
        default = {"ctc": 1.0, "attention": 0.0, "joint": ESPNET_JOINT_CTC_WEIGHT,
                   "rescore": 0.0 if self.has_prompt else self.config.ctc_weight}[decode]  # Dolphin: 0
        if lexicon is not None and decode == "rescore":
            raise ValueError("a lexicon acts in the beam searches (decode ctc, attention or joint), not in rescore")
        if ctc_weight is None or decode in ("ctc", "attention"):
            ctc_weight = default
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1], got {ctc_weight}")
        return decode, float(ctc_weight)
