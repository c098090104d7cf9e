"""The ASR model's configuration: speech encoder, attention decoder (or none: CTC only), token list and special ids;
`config.json` with model_type "mm-asr" (ESPnet's config.yaml is read by `mm.models.convert_espnet`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from decoders.asr_decoder import ASRDecoderConfig
from decoders.checkpoint import check_config_keys
from encoders.speech_encoder import SpeechEncoderConfig

OUR_MODEL_TYPE = "mm-asr"
MIN_FRAMES = 7  # feature frames the subsampling needs


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
