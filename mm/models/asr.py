"""The speech encoder as a complete ASR model: E-Branchformer + CTC + Transformer attention decoder (ESPnet / Dolphin).

One recording flows through:
    file / array -> load_audio (mono, 16 kHz, float32) -> windows (whole file up to `max_window` s, else energy VAD,
    `mm.models.vad`) -> padded batch [B, S] -> SpeechEncoder.encode (log-mel, global MVN, E-Branchformer) -> enc
    [B, T', d] -> CTC log-probs [B, T', V] -> decode (`mm.models.asr_search`: "ctc" greedy | "attention" beam |
    "joint" CTC/attention beam | "rescore", with Dolphin's prompt) -> token ids -> token list -> sentencepiece
    pieces -> text; optional CTC forced alignment -> word times.

Timestamps. Encoder frame t is input feature frame 4t after the 4x Conv2d subsampling; feature frames are
hop_length / sample_rate apart (10 ms for ESPnet/Dolphin), so one encoder frame is 40 ms and a token aligned to
encoder frames [s, e) is given the times [s * 0.04, e * 0.04) s from the start of its window, plus the window's
offset in the recording. CTC alignments are peaky and may lag the acoustics by a frame or two; nothing corrects that.

Short input rule. The subsampling needs 7 feature frames, i.e. at least 6 * hop_length samples (60 ms at 16 kHz);
`transcribe` returns an empty transcript (text "", no tokens) for a recording or window shorter than that, while
`encode` raises SpeechTooShortError. Empty files, unreadable files and NaN/inf samples raise AudioError.

Long recordings. Up to `max_window` seconds (30, Dolphin's training length) a recording is decoded whole, as ESPnet
and Dolphin do; longer ones are cut into windows of at most `max_window` seconds by the energy VAD of
`mm.models.vad.speech_windows` (silence between windows is not decoded). Windows of all files are decoded together
in padded batches of `batch_size` (as in ESPnet, convolutions see the padding, so a batch can differ from one-by-one
decoding in the last digits), and their results are stitched with the window offsets added.

Checkpoints: `ASRModel.from_espnet_dir` reads an ESPnet/Dolphin experiment directory (config.yaml, *.pth,
feats_stats.npz, BPE model; a recipe root with exp/*/; or a model-zoo pack whose meta.yaml names them) through
`mm.models.convert_espnet`; `save_pretrained` / `from_pretrained` use our format: config.json (model_type
"mm-asr"), model.safetensors with ESPnet's tensor names (the global MVN statistics are `normalize.mean` /
`normalize.std` there), tokenizer.model (the sentencepiece BPE model).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from decoders.asr_decoder import TransformerDecoder
from decoders.checkpoint import CheckpointError, read_json, read_safetensors, write_hf_weights
from decoders.ctc import CTC
from decoders.lexicon import LEXICON_WEIGHT
from decoders.tokenizer import SentencePieceTokenizer
from encoders.audio import MAX_MINUTES, check_minutes, load_audio
from encoders.speech_encoder import SpeechEncoder
from mm.models.asr_config import OUR_MODEL_TYPE, ASRConfig
from mm.models.asr_search import ASRSearch
from mm.models.convert_espnet import espnet_state_dict, load_espnet_dir, load_espnet_state_dict
from mm.models.s2t_tokens import S2TTokens, is_special
from mm.models.transcript import Transcript, Word, timed_words, word_groups
from mm.models.vad import decode_windows


class ASRModel(ASRSearch, nn.Module):
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
        """Aligned tokens as timed words (`mm.models.transcript.word_groups`; specials print nothing)."""
        c = self.config
        groups = word_groups(ids, spans, [c.token_list[i] for i in ids], c.token_type, self.special_ids)
        return timed_words(groups, self.tokens_to_text, c.frame_shift, offset)

    # ------------------------------------------------------------------------------------------- the one contract

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
                   progress: bool | None = False, max_minutes: float | None = MAX_MINUTES,
                   on_segment=None, lexicon=None,
                   lexicon_weight: float = LEXICON_WEIGHT) -> Transcript | list[Transcript]:
        """Transcribe a file path, a waveform (with sample_rate), or a list of them (then a list is returned).

        decode: "ctc" (greedy), "attention", "joint" (default with a decoder; ctc_weight 0.5 as ESPnet) or
        "rescore" (CTC prefix beam n-best rescored by the decoder; ctc_weight from the training config, 0 for
        Dolphin/OWSM prompt models as Dolphin's attention_rescoring).
        timestamps: word times from CTC forced alignment. progress: tqdm bar over windows (None: when a TTY).
        max_minutes: a longer recording is an AudioError naming it, its length and the limit, from the file's header
        before anything is decoded (arrays and headerless files as they are read); None: no limit.
        on_segment: called as on_segment(item index, Segment) as soon as each window is decoded, in time order per
        recording and recording after recording (windows are then batched in that order, not by length).
        lexicon: a word list (a `decoders.lexicon.Lexicon`, a file of one word per line, or a list of words) that the
        beam searches spell with, its look-ahead unigram weighted by lexicon_weight; "ctc" then searches a beam too;
        not with "rescore" (a ValueError) or a character model.
        """
        from tqdm import tqdm

        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        self._decode_options(decode, ctc_weight, lexicon)  # bad options fail before any audio is read
        lexicon = self.lexicon_scorer(lexicon)
        rate = self.config.speech.frontend.sample_rate
        limit = check_minutes(items, max_minutes)  # every header before any file is decoded
        # read everything first: a bad file fails before minutes of decoding
        waves = [load_audio(item, sample_rate=sample_rate, target_rate=rate, max_seconds=limit)[0] for item in items]
        jobs = [(r, s, e) for r, wave in enumerate(waves)  # (recording, start sample, end sample)
                for s, e in decode_windows(wave, rate, max_window) if e - s >= self.config.min_samples]
        order = range(len(jobs)) if on_segment else sorted(range(len(jobs)), key=lambda j: jobs[j][2] - jobs[j][1],
                                                             reverse=True)  # by length: less padding
        results, emitted = {}, 0
        bar = tqdm(total=len(jobs), unit="window", disable=(None if progress is None else not progress))
        try:
            for k in range(0, len(order), batch_size):
                chunk = order[k: k + batch_size]
                segs = self.decode_batch([waves[jobs[j][0]][jobs[j][1]: jobs[j][2]] for j in chunk], decode, beam,
                                         ctc_weight, timestamps, language, region,
                                         offsets=[jobs[j][1] / rate for j in chunk], lexicon=lexicon,
                                         lexicon_weight=lexicon_weight)
                results.update(zip(chunk, segs))
                bar.update(len(chunk))
                while on_segment and emitted in results:  # jobs are in (recording, time) order
                    on_segment(jobs[emitted][0], results[emitted])
                    emitted += 1
        finally:
            bar.close()
        joiner = "" if self.config.token_type == "char" else " "
        out = [Transcript.from_segments([results[j] for j in range(len(jobs)) if jobs[j][0] == r],  # time order
                                        round(wave.numel() / rate, 3),
                                        str(item) if isinstance(item, (str, os.PathLike)) else None, joiner)
               for r, (wave, item) in enumerate(zip(waves, items))]
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_espnet_dir(cls, path: str | os.PathLike, model_file: str | os.PathLike | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "ASRModel":
        """Load an ESPnet/Dolphin experiment: a directory (or its config.yaml) with config.yaml and the model *.pth;
        feats_stats.npz and the BPE model are found from normalize_conf.stats_file and bpemodel (find_espnet_files)."""
        return load_espnet_dir(cls, path, model_file).to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write our format: config.json, model.safetensors (ESPnet tensor names), tokenizer.model."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, ensure_ascii=False))
        write_hf_weights(path, espnet_state_dict(self))
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
        load_espnet_state_dict(model, read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
        return model.to(device=device, dtype=dtype).eval()
