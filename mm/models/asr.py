"""The speech encoder as a complete ASR model: E-Branchformer + CTC + Transformer attention decoder (ESPnet / Dolphin).

One recording flows through:
    file / array -> load_audio (mono, 16 kHz, float32) -> windows (whole file up to `max_window` s, else energy VAD)
    -> padded batch [B, S] -> SpeechEncoder.encode (log-mel, global MVN, E-Branchformer) -> enc [B, T', d]
    -> CTC log-probs [B, T', V] -> decode: "ctc" greedy | "attention" beam | "joint" CTC/attention beam | "rescore"
    -> token ids -> token list -> sentencepiece pieces -> text; optional CTC forced alignment -> word times.

Timestamps. Encoder frame t is input feature frame 4t after the 4x Conv2d subsampling; feature frames are
hop_length / sample_rate apart (10 ms for ESPnet/Dolphin), so one encoder frame is 40 ms and a token aligned to
encoder frames [s, e) is given the times [s * 0.04, e * 0.04) s from the start of its window, plus the window's
offset in the recording. CTC alignments are peaky and may lag the acoustics by a frame or two; nothing corrects that.

Short input rule. The subsampling needs 7 feature frames, i.e. at least 6 * hop_length samples (60 ms at 16 kHz);
`transcribe` returns an empty transcript (text "", no tokens) for a recording or window shorter than that, while
`encode` raises SpeechTooShortError. Empty files, unreadable files and NaN/inf samples raise AudioError.

Long recordings. Up to `max_window` seconds (30, Dolphin's training length) a recording is decoded whole, as ESPnet
and Dolphin do. Longer ones are cut by `speech_windows`, an energy VAD: 10 ms frames are speech when their energy
is above max(-65 dBFS, min(noise + 10 dB, peak - 10 dB)) (noise = 10th, peak = 99th percentile of frame energies);
pauses under 0.3 s are bridged, speech runs are padded by 0.2 s, and consecutive runs are packed into windows of at
most `max_window` seconds; a run longer than that is cut at its quietest 10 ms frame in the second half of the
window. Silence between windows is not decoded. Windows of all files are decoded together in padded batches of
`batch_size` (as in ESPnet, convolutions see the padding, so a batch can differ from one-by-one decoding in the
last digits), and their results are stitched with the window offsets added.

Dolphin / OWSM prompts. When the token list has `<asr>` and language tokens (the blocks of s2t_tokens: Dolphin's
138 languages <ab>..<zu> and 179 regions <AD>..<ZA>), the decoder is primed with
`<sos><lang>[<region>]<asr>[<notimestamp>]` (<notimestamp>, or OWSM's <notimestamps>, whichever the list has: our
timestamps come from CTC, never from time tokens), and while searching, the time tokens <0.00>..<30.00> are
forbidden as ESPnet S2T's ScoreFilter forbids them after <notimestamp(s)>. Unless `language` is given, language and
region are detected per window as Dolphin's DolphinSpeech2Text.detect_language does: the argmax of the decoder's
log-probabilities after `<sos>` over the language block, then after `<sos><lang>` over the region block; a given
language skips the first step; a region can only be given with its language. In joint decoding the CTC prefix
scorer, as ESPnet's with a hyp_primer, lets the first token start at frame len(prompt) - 1, and the search stops
at T' + 1 - len(prompt) tokens (T' - 4 with Dolphin's prompt), as Dolphin's. "rescore" is Dolphin's
attention_rescoring (ctc_weight 0 by default for these models). The text leaves out every `<...>` token, as ESPnet
S2T's text_nospecial (what Dolphin returns); `tokens` / `token_ids` keep them.

Checkpoints: `ASRModel.from_espnet_dir` reads an ESPnet/Dolphin experiment directory (config.yaml, *.pth,
feats_stats.npz, BPE model; a recipe root with exp/*/; or a model-zoo pack whose meta.yaml names them);
`save_pretrained` / `from_pretrained` use our format: config.json (model_type "mm-asr"), model.safetensors with
ESPnet's tensor names (the global MVN statistics are `normalize.mean` / `normalize.std` there), tokenizer.model
(the sentencepiece BPE model).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from decoders.asr_decoder import ASRDecoderConfig, TransformerDecoder, convert_espnet_decoder_state_dict
from decoders.beam_search import attention_rescoring, batch_beam_search
from decoders.checkpoint import (CheckpointError, check_config_keys, load_state_dict_strict, read_json, read_safetensors, read_torch,
                                 write_hf_weights)
from decoders.ctc import CTC, convert_espnet_ctc_state_dict, ctc_forced_align, ctc_greedy_decode
from decoders.tokenizer import SentencePieceTokenizer
from encoders.audio import load_audio
from encoders.convert_espnet import convert_espnet_speech_encoder_state_dict
from encoders.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from encoders.frontend import GlobalMVN
from mm.models.espnet_files import find_espnet_files
from mm.models.s2t_tokens import S2TTokens, is_special, token_id
from mm.models.transcript import Segment, Transcript, Word, timed_words
from mm.models.vad import speech_windows

OUR_MODEL_TYPE = "mm-asr"
MIN_FRAMES = 7  # feature frames the subsampling needs
DECODE_MODES = ("ctc", "attention", "joint", "rescore")
ESPNET_JOINT_CTC_WEIGHT = 0.5  # Speech2Text's default ctc_weight
ESPNET_PARTS = ("frontend.", "normalize.", "encoder.", "ctc.", "decoder.")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class ASRConfig:
    """Speech encoder + CTC + attention decoder (None: CTC only) + the token list and its special ids.

    token_type: "bpe" (sentencepiece pieces, needs tokenizer.model), "char" (`<space>` is a space) or "word".
    ctc_weight: the training CTC weight (ESPnet model_conf), the default weight of attention rescoring.
    """

    speech: SpeechEncoderConfig
    decoder: ASRDecoderConfig | None
    token_list: list[str]
    sos: int
    eos: int
    blank: int = 0
    token_type: str = "bpe"
    ctc_weight: float = 0.5

    def __post_init__(self):
        V = len(self.token_list)
        for name in ("sos", "eos", "blank"):
            if not 0 <= getattr(self, name) < V:
                raise ValueError(f"{name} id {getattr(self, name)} is outside the token list of {V} tokens")
        if self.blank != 0:
            raise ValueError(f"the CTC blank must be token 0 (ESPnet's prefix scorer assumes it), got {self.blank}")
        if self.decoder is not None and self.decoder.vocab_size != V:
            raise ValueError(f"decoder vocab_size {self.decoder.vocab_size} != {V} tokens in the token list")
        if self.token_type not in ("bpe", "char", "word"):
            raise ValueError(f"token_type {self.token_type!r} is not supported (bpe, char or word)")

    @property
    def frame_shift(self) -> float:
        """Seconds between encoder frames (see SpeechEncoderConfig.frame_shift)."""
        return self.speech.frame_shift

    @property
    def min_samples(self) -> int:
        """Fewest samples that give the 7 feature frames the subsampling needs (frames = S // hop + 1)."""
        f = self.speech.frontend
        return max((MIN_FRAMES - 1) * f.hop_length, f.n_fft // 2 + 1)

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        d = dataclasses.asdict(self)
        d["speech"] = self.speech.to_dict()
        d["decoder"] = None if self.decoder is None else self.decoder.to_dict()
        return {"model_type": OUR_MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ASRConfig":
        """Inverse of to_dict; unknown keys are an error."""
        d = {k: v for k, v in d.items() if k != "model_type"}
        check_config_keys(cls, d)
        d["speech"] = SpeechEncoderConfig.from_dict(d["speech"])
        d["decoder"] = None if d.get("decoder") is None else ASRDecoderConfig.from_dict(d["decoder"])
        return cls(**d)

    @classmethod
    def from_espnet(cls, config: dict, token_list: list[str]) -> "ASRConfig":
        """From a parsed ESPnet ASR/S2T `config.yaml` and its token list."""
        speech = SpeechEncoderConfig.from_espnet(config)
        decoder = None
        if config.get("decoder") not in (None, "none"):
            if config["decoder"] != "transformer":
                raise ValueError(f"config.yaml: decoder={config['decoder']!r} is not supported (only 'transformer')")
            decoder = ASRDecoderConfig.from_espnet(config.get("decoder_conf") or {}, len(token_list),
                                                   speech.encoder.output_size)
        model_conf = config.get("model_conf") or {}

        def special(key: str, names: tuple[str, ...]) -> int:
            # ESPnet: the symbol named in model_conf if it is in the list, else the last token
            for name in ((model_conf[key],) if key in model_conf else ()) + names:
                if name in token_list:
                    return token_list.index(name)
            return len(token_list) - 1

        blank_sym = model_conf.get("sym_blank", "<blank>")
        return cls(
            speech=speech, decoder=decoder, token_list=list(token_list),
            sos=special("sym_sos", ("<sos/eos>", "<sos>")), eos=special("sym_eos", ("<sos/eos>", "<eos>")),
            blank=token_list.index(blank_sym) if blank_sym in token_list else 0,
            token_type=config.get("token_type") or "bpe",
            ctc_weight=float(model_conf.get("ctc_weight", 0.5)),
        )


# ----------------------------------------------------------------------------------------------- model


class ASRModel(nn.Module):
    """ESPnet/Dolphin hybrid CTC/attention ASR model: waveform -> encoder -> CTC head and attention decoder -> text."""

    def __init__(self, config: ASRConfig, tokenizer: SentencePieceTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.speech = SpeechEncoder(config.speech)
        self.ctc = CTC(len(config.token_list), config.speech.encoder.output_size)
        self.decoder = TransformerDecoder(config.decoder) if config.decoder is not None else None
        self.s2t = S2TTokens.from_token_list(config.token_list)
        self.language_ids = list(self.s2t.languages)
        self.region_ids = list(self.s2t.regions)
        self.asr_id = self.s2t.asr
        self.notimestamps_id = self.s2t.notimestamps
        self.special_ids = self._special_ids()

    def _special_ids(self) -> set[int]:
        """Ids that print nothing: blank, sos, eos and `<...>` tokens; for an ASR (not S2T) model `<...>` pieces of the
        BPE model (<unk>, user symbols) and char/word `<space>`, `<unk>` print, as in ESPnet's asr_inference text."""
        c = self.config
        out = {c.blank, c.sos, c.eos}
        if self.has_prompt:  # ESPnet S2T's text_nospecial
            return out | {i for i, t in enumerate(c.token_list) if is_special(t)}
        for i, t in enumerate(c.token_list):
            if t.startswith("<") and t.endswith(">") and len(t) > 2:
                if c.token_type == "bpe" and self.tokenizer is not None:
                    sp = self.tokenizer.sp
                    if sp.id_to_piece(sp.piece_to_id(t)) == t:  # <unk> and user symbols of the BPE model print
                        continue
                elif t in ("<space>", "<unk>"):
                    continue
                out.add(i)
        return out

    @property
    def has_prompt(self) -> bool:
        """True for Dolphin-style models whose decoder is primed with <sos><lang><region><asr>."""
        return self.asr_id is not None and bool(self.language_ids) and self.decoder is not None

    @property
    def device(self) -> torch.device:
        """The device of the weights (inputs are moved there)."""
        return self.ctc.ctc_lo.weight.device

    # ------------------------------------------------------------------------------------------- forward

    def encode(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform [B, S] at 16 kHz, lengths [B] -> (enc [B, T', d], enc_lengths [B]), as ESPnet's encode()."""
        return self.speech.encode(speech, speech_lengths)

    def ctc_log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """CTC frame log-posteriors [B, T', V] (float32)."""
        return self.ctc.log_softmax(enc)

    # ------------------------------------------------------------------------------------------- tokens/text

    def tokens_to_text(self, ids: list[int]) -> str:
        """Text of token ids as ESPnet's token list + tokenizer give it; special tokens print nothing."""
        c = self.config
        pieces = [c.token_list[i] for i in ids if i not in self.special_ids]
        if c.token_type == "bpe":
            if self.tokenizer is None:
                raise ValueError("this model has no BPE model (tokenizer.model / bpemodel) to turn tokens into text")
            return self.tokenizer.sp.decode_pieces(pieces)
        if c.token_type == "char":
            return "".join(" " if p == "<space>" else p for p in pieces)
        return " ".join(pieces)

    def _words(self, ids: list[int], spans, offset: float) -> list[Word]:
        """Group aligned tokens into words (a BPE piece starting with '▁', a <space> char, or each word token)."""
        c = self.config
        groups: list[list[tuple[int, object]]] = []
        for i, span in zip(ids, spans):
            if i in self.special_ids:
                continue
            t = c.token_list[i]
            if c.token_type == "char" and t == "<space>":
                groups.append([])
                continue
            new = c.token_type == "word" or (c.token_type == "bpe" and t.startswith("▁"))
            if new or not groups:
                groups.append([])
            groups[-1].append((i, span))
        return timed_words(groups, self.tokens_to_text, c.frame_shift, offset)

    # ------------------------------------------------------------------------------------------- prompts

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

    # ------------------------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def decode_batch(self, waves: list[torch.Tensor], decode: str | None = None, beam: int = 10,
                     ctc_weight: float | None = None, timestamps: bool = False, language: str | None = None,
                     region: str | None = None, offsets: list[float] | None = None) -> list[Segment]:
        """Decode 16 kHz waveforms (each [S] >= min_samples) as one padded batch; one Segment per waveform."""
        decode, ctc_weight = self._decode_options(decode, ctc_weight)
        offsets = offsets or [0.0] * len(waves)
        dev = self.device
        lengths = torch.tensor([w.numel() for w in waves], device=dev)
        batch = torch.zeros(len(waves), int(lengths.max()), device=dev)  # [B, S]
        for b, w in enumerate(waves):
            batch[b, : w.numel()] = w.to(dev)
        enc, enc_lengths = self.encode(batch, lengths)  # [B, T', d]
        log_probs = self.ctc_log_probs(enc)  # [B, T', V]
        # the prompt (and language detection) even for CTC decoding, which reports the language too
        prefixes, lang_region = self._prefixes(enc, enc_lengths, language, region)
        c = self.config
        if decode == "ctc":
            hyps = [[i for i in ids if i not in (c.sos, c.eos)] for ids in ctc_greedy_decode(log_probs, enc_lengths)]
        elif decode == "rescore":
            hyps = []
            for b in range(len(waves)):
                T = int(enc_lengths[b])
                best = attention_rescoring(self.decoder, enc[b, :T], log_probs[b, :T], sos=c.sos, eos=c.eos,
                                           beam_size=beam, ctc_weight=ctc_weight, prefix=prefixes[b])
                hyps.append(best[0].tokens)
        else:
            hyps = [None] * len(waves)
            groups: dict[tuple, list[int]] = {}
            for b, p in enumerate(prefixes):  # utterances with the same prompt are searched together
                groups.setdefault(tuple(p), []).append(b)
            for prefix, idx in groups.items():
                sel = torch.tensor(idx, device=dev)
                lp = log_probs[sel] if ctc_weight > 0 else None
                nbest = batch_beam_search(self.decoder, enc[sel], enc_lengths[sel], lp, sos=c.sos, eos=c.eos,
                                          beam_size=beam, ctc_weight=ctc_weight, prefix=list(prefix),
                                          suppress=self.s2t.suppressed(list(prefix)), prompt_in_maxlen=True)
                for b, n in zip(idx, nbest):
                    hyps[b] = n[0].tokens if n else []
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

    def _align(self, log_probs: torch.Tensor, ids: list[int], offset: float) -> list[Word]:
        """Words with times from a CTC forced alignment of ids on log_probs [T', V]; [] when none fits."""
        if not ids:
            return []
        try:
            spans = ctc_forced_align(log_probs, ids, blank=self.config.blank)
        except ValueError:  # more tokens than frames allow (an attention hypothesis CTC cannot emit)
            return []
        return self._words(ids, spans, offset)

    def _decode_options(self, decode: str | None, ctc_weight: float | None) -> tuple[str, float]:
        if decode is None:
            decode = "joint" if self.decoder is not None else "ctc"
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if decode != "ctc" and self.decoder is None:
            raise ValueError(f"decode={decode!r} needs an attention decoder; this model is CTC only (use 'ctc')")
        default = {"ctc": 1.0, "attention": 0.0, "joint": ESPNET_JOINT_CTC_WEIGHT,
                   "rescore": 0.0 if self.has_prompt else self.config.ctc_weight}[decode]  # Dolphin: 0
        if ctc_weight is None or decode in ("ctc", "attention"):
            ctc_weight = default
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1], got {ctc_weight}")
        return decode, float(ctc_weight)

    @torch.no_grad()
    def caption(self, image, **kwargs):
        """An ASR model hears speech only: a clear error."""
        raise ValueError("this ASR model has no image encoder, so it cannot caption; use the multimodal model (mm.load()) "
                         "or a LLaVA checkpoint")

    def chat(self, messages, **kwargs):
        """An ASR model has no language model to chat with: a clear error."""
        raise ValueError("this ASR model cannot chat (it has no language model over text); use the multimodal model")

    def transcript(self, audio, source: str | None = None, decode: str | None = None, beam: int = 10,
                   **kwargs) -> Transcript:
        """The `Transcript` of one recording with word times: `transcribe(..., timestamps=True)`, as the multimodal
        model's `transcript` (options as `transcribe`)."""
        result = self.transcribe(audio, decode=decode, beam=beam, timestamps=True, **kwargs)
        result.source = source if source is not None else result.source
        return result

    def transcribe(self, audio, decode: str | None = None, beam: int = 10, ctc_weight: float | None = None,
                   timestamps: bool = False, batch_size: int = 8, sample_rate: int | None = None,
                   language: str | None = None, region: str | None = None, max_window: float = 30.0,
                   progress: bool | None = False) -> Transcript | list[Transcript]:
        """Transcribe a file path, a waveform (with sample_rate), or a list of them (then a list is returned).

        decode: "ctc" (greedy), "attention", "joint" (default with a decoder; ctc_weight 0.5 as ESPnet) or
        "rescore" (CTC prefix beam n-best rescored by the decoder; ctc_weight from the training config, 0 for
        Dolphin/OWSM prompt models as Dolphin's attention_rescoring).
        timestamps: word times from CTC forced alignment. progress: tqdm bar over windows (None: when a TTY).
        """
        from tqdm import tqdm

        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        self._decode_options(decode, ctc_weight)  # bad options fail before any audio is read
        rate = self.config.speech.frontend.sample_rate
        waves, sources = [], []
        for item in items:  # read everything first: a bad file fails before minutes of decoding
            wave, _ = load_audio(item, sample_rate=sample_rate, target_rate=rate)
            waves.append(wave)
            sources.append(str(item) if isinstance(item, (str, os.PathLike)) else None)
        jobs = []  # (recording, start sample, end sample)
        for r, wave in enumerate(waves):
            if wave.numel() <= max_window * rate:
                spans = [(0, wave.numel())]
            else:
                spans = speech_windows(wave, rate, max_window)
            jobs += [(r, s, e) for s, e in spans if e - s >= self.config.min_samples]
        order = sorted(range(len(jobs)), key=lambda j: jobs[j][2] - jobs[j][1], reverse=True)  # less padding
        results: dict[int, Segment] = {}
        bar = tqdm(total=len(jobs), unit="window", disable=(None if progress is None else not progress))
        try:
            for k in range(0, len(order), batch_size):
                chunk = order[k: k + batch_size]
                segs = self.decode_batch([waves[jobs[j][0]][jobs[j][1]: jobs[j][2]] for j in chunk], decode, beam,
                                         ctc_weight, timestamps, language, region,
                                         offsets=[jobs[j][1] / rate for j in chunk])
                results.update(zip(chunk, segs))
                bar.update(len(chunk))
        finally:
            bar.close()
        out = []
        joiner = "" if self.config.token_type == "char" else " "
        for r, wave in enumerate(waves):
            segs = [results[j] for j in range(len(jobs)) if jobs[j][0] == r]  # jobs are in time order
            ids = [i for s in segs for i in s.token_ids]
            langs = Counter((s.language, s.region) for s in segs if s.language is not None).most_common(1)
            out.append(Transcript(
                # one window keeps ESPnet's text exactly; windows are joined without their edge spaces
                text=segs[0].text if len(segs) == 1 else joiner.join(s.text.strip() for s in segs if s.text.strip()),
                tokens=[t for s in segs for t in s.tokens], token_ids=ids, segments=segs,
                duration=round(wave.numel() / rate, 3), language=langs[0][0][0] if langs else None,
                region=langs[0][0][1] if langs else None, source=sources[r],
            ))
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------- checkpoints

    def espnet_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under ESPnet's names (frontend.*, normalize.*, encoder.*, ctc.*, decoder.*)."""
        sd = dict(self.speech.state_dict())
        sd.update({"ctc." + k: v for k, v in self.ctc.state_dict().items()})
        if self.decoder is not None:
            sd.update({"decoder." + k: v for k, v in self.decoder.state_dict().items()})
        return sd

    def load_espnet_state_dict(self, sd: dict[str, torch.Tensor], source: str,
                               stats_file: str | os.PathLike | None = None) -> "ASRModel":
        """Load ESPnet-named weights; MVN statistics missing from sd are read from stats_file (feats_stats.npz)."""
        other = sorted({k.split(".")[0] for k in sd if not k.startswith(ESPNET_PARTS)})
        if other:
            raise CheckpointError(f"{source}: parts {other} are not supported (expected {', '.join(ESPNET_PARTS)})")
        sd = dict(sd)
        if self.speech.normalize is not None and "normalize.mean" not in sd:
            if stats_file is None:
                raise CheckpointError(f"{source}: no normalize.mean/std in the weights and no feats_stats.npz found")
            c = self.config.speech
            mvn = GlobalMVN.from_stats_file(stats_file, c.norm_means, c.norm_vars)
            sd["normalize.mean"], sd["normalize.std"] = mvn.mean, mvn.std
        if "frontend.logmel.melmat" not in sd:  # a fixed function of the front-end config, not learned
            sd["frontend.logmel.melmat"] = self.speech.frontend.logmel.melmat
        full = {"speech." + k: v for k, v in convert_espnet_speech_encoder_state_dict(sd).items()}
        try:
            full.update({"ctc." + k: v for k, v in convert_espnet_ctc_state_dict(sd).items()})
            if self.decoder is not None:
                full.update({"decoder." + k: v for k, v in convert_espnet_decoder_state_dict(sd).items()})
        except KeyError as e:
            raise CheckpointError(f"{source}: {e.args[0]}") from None
        if self.decoder is None and any(k.startswith("decoder.") for k in sd):
            raise CheckpointError(f"{source}: has decoder.* weights but the config has no decoder")
        load_state_dict_strict(self, full, source)
        return self

    @classmethod
    def from_espnet_dir(cls, path: str | os.PathLike, model_file: str | os.PathLike | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "ASRModel":
        """Load an ESPnet/Dolphin experiment: a directory (or its config.yaml) with config.yaml and the model *.pth;
        feats_stats.npz and the BPE model are found from normalize_conf.stats_file and bpemodel (find_espnet_files)."""
        files = find_espnet_files(path, model_file)
        config = files["config_dict"]
        tokenizer = SentencePieceTokenizer(files["bpemodel"]) if files["bpemodel"] is not None else None
        try:
            cfg = ASRConfig.from_espnet(config, files["token_list"])
        except ValueError as e:
            raise CheckpointError(f"{files['config']}: {str(e).removeprefix('config.yaml: ')}") from e
        if cfg.token_type == "bpe" and tokenizer is None:
            raise CheckpointError(f"{files['config']}: token_type bpe but the bpemodel {config.get('bpemodel')!r} "
                                  "was not found (looked next to the config and in the directories above it)")
        model = cls(cfg, tokenizer)
        model.load_espnet_state_dict(read_torch(files["model"]), str(files["model"]), files["stats_file"])
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write our format: config.json, model.safetensors (ESPnet tensor names), tokenizer.model."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False))
        write_hf_weights(path, self.espnet_state_dict())
        if self.tokenizer is not None:
            self.tokenizer.save(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "ASRModel":
        """Load a directory written by save_pretrained."""
        path = Path(path)
        raw = read_json(path / "config.json")
        if raw.get("model_type") != OUR_MODEL_TYPE:
            raise CheckpointError(f"{path / 'config.json'}: model_type {raw.get('model_type')!r} is not "
                                  f"{OUR_MODEL_TYPE!r}")
        try:
            cfg = ASRConfig.from_dict(raw)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        tok_file = path / "tokenizer.model"
        tokenizer = SentencePieceTokenizer(tok_file) if tok_file.is_file() else None
        if cfg.token_type == "bpe" and tokenizer is None:
            raise CheckpointError(f"{tok_file}: missing (token_type is bpe)")
        model = cls(cfg, tokenizer)
        model.load_espnet_state_dict(read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
        return model.to(device=device, dtype=dtype).eval()
