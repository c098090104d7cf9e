"""The speech encoder as ESPnet's ASR model runs it in encode(): log-mel front end, SpecAugment (training), global
mean/variance normalisation, then the E-Branchformer with its 4x convolutional subsampling."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from decoders.checkpoint import check_config_keys
from encoders.ebranchformer import SUBSAMPLING, EBranchformerConfig, EBranchformerEncoder
from encoders.frontend import FrontendConfig, GlobalMVN, LogMelFrontend, SpecAugment, SpecAugmentConfig


@dataclass
class SpeechEncoderConfig:
    """Front end + SpecAugment (training) + global MVN + E-Branchformer, as in ESPnet's ASR model encode()."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    encoder: EBranchformerConfig = field(default_factory=EBranchformerConfig)
    specaug: SpecAugmentConfig | None = None
    global_mvn: bool = True  # statistics live in the state dict as normalize.mean / normalize.std
    norm_means: bool = True
    norm_vars: bool = True

    @property
    def frame_shift(self) -> float:
        """Seconds between encoder frames: hop_length / sample_rate x SUBSAMPLING (0.04 for 10 ms hops)."""
        return self.frontend.hop_length / self.frontend.sample_rate * SUBSAMPLING

    def __post_init__(self):
        if self.encoder.input_size != self.frontend.n_mels:
            raise ValueError(f"encoder input_size {self.encoder.input_size} != frontend n_mels {self.frontend.n_mels}")

    @classmethod
    def from_espnet(cls, config: dict) -> "SpeechEncoderConfig":
        """Build from a parsed ESPnet ASR/S2T `config.yaml` (frontend, specaug, normalize, encoder and their _conf)."""
        # (key, ESPnet's default when the key is absent, what we implement)
        choices = (
            ("frontend", "default", ("default",)), ("encoder", "rnn", ("e_branchformer",)),
            ("normalize", "utterance_mvn", ("global_mvn", None)), ("specaug", None, ("specaug", None)),
            ("preencoder", None, (None,)), ("postencoder", None, (None,)),
        )  # fmt: skip
        for key, default, allowed in choices:
            if config.get(key, default) not in allowed:
                raise ValueError(
                    f"config.yaml: {key}={config.get(key, default)!r} is not supported (expected one of {allowed})"
                )
        frontend = FrontendConfig.from_espnet(config.get("frontend_conf") or {})
        normalize_conf = dict(config.get("normalize_conf") or {})
        normalize_conf.pop("stats_file", None)  # the statistics are in the state dict
        return cls(
            frontend=frontend,
            encoder=EBranchformerConfig.from_espnet(config.get("encoder_conf") or {}, input_size=frontend.n_mels),
            specaug=SpecAugmentConfig.from_espnet(config.get("specaug_conf") or {}) if config.get("specaug") else None,
            global_mvn=config["normalize"] == "global_mvn",
            norm_means=bool(normalize_conf.get("norm_means", True)),
            norm_vars=bool(normalize_conf.get("norm_vars", True)),
        )

    def to_dict(self) -> dict:
        """Plain nested dict for config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpeechEncoderConfig":
        """Inverse of to_dict; unknown keys are an error."""
        d = dict(d)
        check_config_keys(cls, d)
        if "frontend" in d:
            d["frontend"] = FrontendConfig.from_dict(d["frontend"])
        if "encoder" in d:
            d["encoder"] = EBranchformerConfig.from_dict(d["encoder"])
        if d.get("specaug") is not None:
            d["specaug"] = SpecAugmentConfig.from_dict(d["specaug"])
        return cls(**d)


class SpeechEncoder(nn.Module):
    """Waveform [B, S] at 16 kHz -> encoder states [B, T', d] (ESPnet ESPnetASRModel.encode)."""

    def __init__(self, config: SpeechEncoderConfig):
        super().__init__()
        self.config = config
        self.frontend = LogMelFrontend(config.frontend)
        self.specaug = SpecAugment(config.specaug) if config.specaug is not None else None
        self.normalize = None
        if config.global_mvn:
            self.normalize = GlobalMVN(config.frontend.n_mels, config.norm_means, config.norm_vars)
        self.encoder = EBranchformerEncoder(config.encoder)

    def features(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speech [B, S], speech_lengths [B] -> normalized log-mel feats [B, T, n_mels] float32 and lengths."""
        speech = speech[:, : int(speech_lengths.max())]  # ESPnet drops padding beyond the longest utterance
        feats, feat_lengths = self.frontend(speech, speech_lengths)
        if self.specaug is not None and self.training:
            feats, feat_lengths = self.specaug(feats, feat_lengths)
        if self.normalize is not None:
            feats, feat_lengths = self.normalize(feats, feat_lengths)
        return feats, feat_lengths

    def encode(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speech [B, S], speech_lengths [B] -> (enc [B, T', d], enc_lengths [B])."""
        feats, feat_lengths = self.features(speech, speech_lengths)
        dtype = self.encoder.after_norm.weight.dtype
        return self.encoder(feats.to(dtype), feat_lengths)

    forward = encode
