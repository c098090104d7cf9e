"""Transcription for `mm.models.fusion.FusionModel` (a mixin: it needs the model's speech modality, processor,
decoder and tokenizer): joint CTC/LLM beam search, the decoder alone, and timed transcripts of long recordings."""
from __future__ import annotations

import sys
from os import PathLike

import torch
from tqdm import tqdm

from decoders.ctc import ctc_forced_align, ctc_greedy_decode
from decoders.lexicon import LEXICON_WEIGHT, Lexicon, LexiconScorer, as_lexicon
from encoders.audio import MAX_MINUTES, check_minutes
from mm.models.speech_adapter import joint_beam_search
from mm.models.transcript import Segment, Transcript, timed_words, word_groups
from mm.models.vad import decode_windows

TRANSCRIBE_PROMPT = "transcribe the audio."
# The CTC prefix score's weight in the joint search (ESPnet's ctc_weight): measured on the everyday-words model with
# every token scored, 100 held-out clips of everyday words, CER 21.3 / 19.0 / 17.5 / 16.9% at 0.5 / 0.6 / 0.7 / 0.8;
# scene sentences 0% WER up to 0.7, 0.08% at 0.8.
JOINT_CTC_WEIGHT = 0.7
DECODE_CTC_WEIGHT = {"ctc": 1.0, "attention": 0.0, "joint": JOINT_CTC_WEIGHT, None: JOINT_CTC_WEIGHT}
# Below this vocabulary size the joint search gives every token a CTC prefix score, not only the decoder's
# 1.5 x beam best (ESPnet's pre-beam, kept above it, where scoring all V tokens costs T' x V per step): a decoder that
# cannot guess a word (the shipped one, outside its scene grammar) pruned the token the CTC head heard. Measured on
# the everyday-words model, 100 held-out clips of everyday words: joint CER 40.2% with the pre-beam, 21.3% without
# (the CTC head alone: 20.2%), scene sentences unchanged, 1.5x the decoding time.
CTC_SCORES_EVERY_TOKEN_BELOW = 4096


def check_decode(decode: str | None, option: str | None = None) -> None:
    """ValueError unless `decode` is a search the multimodal model has (a key of DECODE_CTC_WEIGHT); the message
    names the option as `option` (default: the keyword argument)."""
    if decode not in DECODE_CTC_WEIGHT:
        raise ValueError(f"{option or f'decode={decode!r}'}: the multimodal model decodes with ctc (its CTC head alone), "
                         "attention (its decoder alone) or joint (both, the default)")


def transcribe_messages(audio) -> list[dict]:
    """The one-turn conversation that asks for the transcript of `audio`."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                         {"type": "text", "text": "\n" + TRANSCRIBE_PROMPT}]}]


class SpeechInference:
    """`transcribe`, `joint_search` and `transcript` of a fusion model (ValueError when it has no speech)."""

    def transcribe(self, audio, stream: bool = False, max_new_tokens: int = 96, ctc_weight: float = JOINT_CTC_WEIGHT,
                   beam_size: int = 4, lexicon=None, lexicon_weight: float = LEXICON_WEIGHT):
        """Transcript of one utterance (path, (waveform, sampling_rate) or a tensor at the model's rate).

        ctc_weight > 0: joint CTC/LLM beam search (`mm.models.speech_adapter.joint_beam_search`), the decoder's scores
        joined with the CTC head's prefix scores, as ESPnet/Dolphin decode; the text then comes whole (stream=True
        yields it once). ctc_weight=0: the decoder alone, greedy, streamed token by token.
        lexicon: words the speaker uses (a `decoders.lexicon.Lexicon`, a word-list file, or a list of words): the
        beam search adds their look-ahead unigram score times `lexicon_weight` (see `lexicon_scorer`); with
        ctc_weight=0 the decoder alone then searches the beam with it."""
        self.need("speech", "transcribe")
        if ctc_weight <= 0 and lexicon is None:
            return self.chat(transcribe_messages(audio), stream=stream, max_new_tokens=max_new_tokens)
        ids, _, _ = self._joint_transcribe(audio, max_new_tokens, ctc_weight, beam_size, lexicon, lexicon_weight)
        text = self.tokenizer.decode(ids).strip()
        return iter([text]) if stream else text

    @torch.inference_mode()
    def joint_search(self, inputs: dict, max_new_tokens: int = 96, ctc_weight: float = JOINT_CTC_WEIGHT,
                     beam_size: int = 4, eos_token_id: int | None = None, lexicon=None,
                     lexicon_weight: float = LEXICON_WEIGHT, **kwargs):
        """Joint CTC/LLM beam search (`mm.models.speech_adapter.joint_beam_search`) for model inputs with one
        utterance per row (`input_ids` with expanded audio tokens, `attention_mask`, `speech`, `speech_lengths`,
        optionally `pixel_values`): the encoder runs once, its CTC posteriors score prefixes and its adapted features
        fill the prompt. Every token gets a CTC score when V < CTC_SCORES_EVERY_TOKEN_BELOW (unless `pre_beam_ratio`
        is given). lexicon: as `transcribe`'s. Returns (n-best hypotheses per row, CTC log-probs [B, T', V], their
        lengths [B])."""
        enc, enc_lengths, f, f_len = self.encode_speech(inputs["speech"], inputs["speech_lengths"])
        h = self.embed(inputs["input_ids"], inputs.get("pixel_values"), (f, f_len))
        log_probs = self.ctc.log_softmax(enc)  # [B, T', V]
        mask = inputs.get("attention_mask")
        V = log_probs.shape[-1]
        if V < CTC_SCORES_EVERY_TOKEN_BELOW:
            kwargs.setdefault("pre_beam_ratio", V / beam_size)  # a pre-beam of V tokens: none
        hyps = joint_beam_search(self.language_model, h, None if mask is None else mask.to(self.device), log_probs,
                                 enc_lengths, eos_token_id=self.tokenizer.eos_id if eos_token_id is None else eos_token_id,
                                 beam_size=beam_size, ctc_weight=ctc_weight, max_new_tokens=max_new_tokens,
                                 lexicon=self.lexicon_scorer(lexicon), lexicon_weight=lexicon_weight, **kwargs)
        return hyps, log_probs, enc_lengths

    def lexicon_scorer(self, lexicon) -> LexiconScorer | None:
        """The `decoders.lexicon.LexiconScorer` of `lexicon` (a Lexicon, a word-list file: one word per line, optionally
        with a count, or a list of words) over this model's tokens, or None for None; the last one is kept, with the
        scores it has worked out, for the next call with the same lexicon."""
        if lexicon is None:
            return None
        key = lexicon if isinstance(lexicon, Lexicon) else str(lexicon) if isinstance(lexicon, (str, PathLike)) \
            else tuple(lexicon)
        cached = getattr(self, "_lexicon", None)
        if cached is None or cached[0] != key:
            lex = as_lexicon(key)
            pieces = [self.tokenizer.sp.id_to_piece(i) for i in range(self.tokenizer.sp.get_piece_size())]
            pieces += ["<special>"] * (self.language_model.config.vocab_size - len(pieces))  # the media tokens' ids
            cached = self._lexicon = (key, LexiconScorer(lex, pieces, self.tokenizer.eos_id))
        return cached[1]

    def _joint_transcribe(self, audio, max_new_tokens: int, ctc_weight: float, beam_size: int, lexicon=None,
                          lexicon_weight: float = LEXICON_WEIGHT):
        """(best token ids, CTC log-probs [T', V] of the utterance, its length in samples)."""
        inputs = self.processor()(transcribe_messages(audio))
        hyps, log_probs, enc_lengths = self.joint_search(inputs, max_new_tokens, ctc_weight, beam_size,
                                                         lexicon=lexicon, lexicon_weight=lexicon_weight)
        return hyps[0][0].tokens, log_probs[0, : int(enc_lengths[0])], int(inputs["speech_lengths"][0])

    @torch.inference_mode()
    def transcript(self, audio, source: str | None = None, max_new_tokens: int = 96, ctc_weight: float | None = None,
                   beam_size: int = 4, progress: bool = False, decode: str | None = None, beam: int | None = None,
                   max_minutes: float | None = MAX_MINUTES, on_segment=None, lexicon=None,
                   lexicon_weight: float = LEXICON_WEIGHT):
        """`mm.models.transcript.Transcript` of a recording: the text of `transcribe`, and word times from a CTC forced
        alignment of its tokens on the encoder's CTC posteriors (words the alignment cannot place get none).

        A recording longer than `max_audio_seconds` is cut into its speech runs (the energy VAD of the ESPnet/Dolphin
        path, `mm.models.vad.speech_windows`, without packing runs together: the model learnt single utterances), at
        most that long each, decoded one after the other (a tqdm bar when `progress`), one Segment each with times in
        the recording; the silence between them is not decoded.
        decode / beam: as the ESPnet/Dolphin model's `transcript`: "ctc" (the CTC head alone), "attention" (the decoder
        alone), "joint" (both; the default), i.e. a CTC weight of 1, 0 or JOINT_CTC_WEIGHT (`ctc_weight` sets it
        directly).
        max_minutes: a longer recording is an error naming it, its length and the limit, from the file's header before
        it is decoded (arrays as they are read); None: no limit.
        on_segment: called with each Segment as soon as its window is decoded, in time order.
        lexicon, lexicon_weight: as `transcribe`'s."""
        self.need("speech", "transcribe")
        check_decode(decode)
        ctc_weight = DECODE_CTC_WEIGHT[decode] if ctc_weight is None else ctc_weight
        beam_size = beam or beam_size
        search = dict(max_new_tokens=max_new_tokens, ctc_weight=ctc_weight, beam_size=beam_size, lexicon=lexicon,
                      lexicon_weight=lexicon_weight)
        rate = self.config.speech.frontend.sample_rate
        limit = check_minutes([audio], max_minutes)  # from the header, before decoding
        wave = self.processor().load_audio(audio, whole=True, max_seconds=limit)  # [S]
        windows = decode_windows(wave, rate, self.config.max_audio_seconds, pack=False)
        segments = []
        for s, e in tqdm(windows, desc="transcribing", unit="window", disable=not progress, file=sys.stderr):
            segments.append(self._segment(wave[s:e], s / rate, search))
            if on_segment:
                on_segment(segments[-1])
        return Transcript.from_segments(segments, wave.numel() / rate, source)

    def _segment(self, wave: torch.Tensor, offset: float, search: dict):
        """The Segment of one window wave [S] that starts `offset` seconds into the recording (`search`: the keyword
        arguments of `_joint_transcribe`)."""
        rate = self.config.speech.frontend.sample_rate
        ids, log_probs, n_samples = self._joint_transcribe((wave, rate), **search)
        try:
            spans = ctc_forced_align(log_probs, ids) if ids else []
        except ValueError:  # more tokens than frames
            spans = []
        pieces = [self.tokenizer.sp.id_to_piece(i) for i in ids]
        words = timed_words(word_groups(ids, spans, pieces), self.tokenizer.decode, self.config.speech.frame_shift, offset)
        end = offset + n_samples / rate
        return Segment(round(offset, 3), round(end, 3), self.tokenizer.decode(ids).strip(), pieces, ids, words)

    @torch.inference_mode()
    def ctc_transcribe(self, audio) -> str:
        """Greedy CTC transcript of one utterance from the encoder alone (no decoder)."""
        self.need("speech", "transcribe")
        wave = self.processor().load_audio(audio)
        enc, enc_lengths, _, _ = self.encode_speech(wave[None], torch.tensor([wave.shape[0]]))
        return self.tokenizer.decode(ctc_greedy_decode(self.ctc.log_softmax(enc), enc_lengths)[0]).strip()
