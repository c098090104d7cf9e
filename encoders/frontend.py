"""Speech front end of ESPnet/Dolphin models: log-mel filterbank, global mean-variance normalization, SpecAugment.

Numbers match ESPnet's `DefaultFrontend` (STFT -> power -> Slaney mel -> clamp -> natural log), `GlobalMVN`
(`feats_stats.npz`) and `SpecAug` (frequency and time masks, same random draws in the same order).
Weight names match ESPnet's under `frontend.` and `normalize.`: `logmel.melmat` [n_fft//2+1, n_mels],
`mean` [n_mels], `std` [n_mels].
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from decoders.checkpoint import check_config_keys


def _parse_rate(fs) -> int:
    """ESPnet writes rates as 16000 or "16k"."""
    if isinstance(fs, str):
        text = fs.strip().lower()
        scale = 1000 if text.endswith("k") else 1
        return int(float(text.rstrip("k")) * scale)
    return int(fs)


@dataclass
class FrontendConfig:
    """Log-mel front end; defaults are Dolphin's (16 kHz, 25 ms Hann window, 10 ms hop, 80 Slaney mels)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None  # None: sample_rate / 2
    htk: bool = False

    # ESPnet DefaultFrontend options that we implement only at their default value
    _ESPNET_FIXED = {"window": "hann", "center": True, "normalized": False, "onesided": True, "apply_stft": True}

    @classmethod
    def from_espnet(cls, frontend_conf: dict) -> "FrontendConfig":
        """Build from ESPnet's `frontend_conf` (config.yaml), using ESPnet's defaults for missing keys."""
        conf = dict(frontend_conf or {})
        for key, value in cls._ESPNET_FIXED.items():
            if key in conf and conf.pop(key) != value:
                raise ValueError(f"frontend_conf: {key}={frontend_conf[key]!r} is not supported (only {value!r})")
        if conf.pop("frontend_conf", None) not in (None, {}):
            raise ValueError("frontend_conf: the WPE/beamformer frontend_conf is not supported")
        known = {"fs", "n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax", "htk"}
        unknown = sorted(set(conf) - known)
        if unknown:
            raise ValueError(f"frontend_conf: unknown keys {unknown}")
        n_fft = int(conf.get("n_fft", 512))
        win_length = conf.get("win_length")
        return cls(
            sample_rate=_parse_rate(conf.get("fs", 16000)),
            n_fft=n_fft,
            win_length=n_fft if win_length is None else int(win_length),  # ESPnet: None means n_fft
            hop_length=int(conf.get("hop_length", 128)),  # ESPnet's default, not Dolphin's 160
            n_mels=int(conf.get("n_mels", 80)),
            fmin=float(conf.get("fmin") or 0.0),
            fmax=None if conf.get("fmax") is None else float(conf["fmax"]),
            htk=bool(conf.get("htk", False)),
        )

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FrontendConfig":
        """Inverse of to_dict; unknown keys are an error."""
        check_config_keys(cls, d)
        return cls(**d)


class LogMel(nn.Module):
    """Power spectrum [B, T, n_fft//2+1] -> natural-log mel energies [B, T, n_mels] (librosa's mel matrix)."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None, htk: bool):
        super().__init__()
        import librosa

        fmax = sample_rate / 2 if fmax is None else fmax
        melmat = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk)
        self.register_buffer("melmat", torch.from_numpy(melmat.T).float())  # [n_fft//2+1, n_mels]

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melmat.to(power.dtype))  # [B, T, n_mels]
        return mel.clamp(min=1e-10).log()


def _pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at padded positions: [B, max_len]."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class LogMelFrontend(nn.Module):
    """Waveform [B, S] at 16 kHz -> log-mel features [B, T, n_mels], T = S // hop + 1; padded frames are 0."""

    def __init__(self, config: FrontendConfig | None = None):
        super().__init__()
        self.config = config = config or FrontendConfig()
        if config.win_length > config.n_fft:
            raise ValueError(f"win_length {config.win_length} exceeds n_fft {config.n_fft}")
        self.logmel = LogMel(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax, config.htk)
        # periodic Hann like torch.hann_window's default; not a checkpoint tensor
        self.register_buffer("window", torch.hann_window(config.win_length, periodic=True, device="cpu"), persistent=False)

    def output_lengths(self, speech_lengths: torch.Tensor) -> torch.Tensor:
        """Frames per utterance: center padding of n_fft//2 on both sides, then (S + 2*(n_fft//2) - n_fft)//hop + 1."""
        c = self.config
        return torch.div(speech_lengths + 2 * (c.n_fft // 2) - c.n_fft, c.hop_length, rounding_mode="floor") + 1

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speech [B, S], speech_lengths [B] -> (feats [B, T, n_mels] float32, feat_lengths [B])."""
        c = self.config
        if speech.dim() != 2:
            raise ValueError(f"speech must be [B, S], got shape {tuple(speech.shape)}")
        min_samples = c.n_fft // 2 + 1  # reflect padding needs more samples than the pad
        if speech.size(1) < min_samples:
            raise ValueError(
                f"speech has {speech.size(1)} samples; the STFT needs at least {min_samples} "
                f"({1000 * min_samples / c.sample_rate:.1f} ms at {c.sample_rate} Hz)"
            )
        # The STFT runs in float32 whatever the model dtype: log of tiny powers is where half precision fails.
        spec = torch.stft(
            speech.float(),
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            win_length=c.win_length,
            window=self.window.float(),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        ).transpose(1, 2)  # [B, T, n_fft//2+1]
        power = spec.real**2 + spec.imag**2
        feats = self.logmel(power)  # [B, T, n_mels]
        feat_lengths = self.output_lengths(speech_lengths.to(feats.device))
        feats = feats.masked_fill(_pad_mask(feat_lengths, feats.size(1))[:, :, None], 0.0)
        return feats, feat_lengths


class GlobalMVN(nn.Module):
    """(x - mean) / std per feature from corpus statistics; padded frames stay 0 (ESPnet GlobalMVN)."""

    def __init__(self, n_feats: int = 80, norm_means: bool = True, norm_vars: bool = True):
        super().__init__()
        self.norm_means = norm_means
        self.norm_vars = norm_vars
        self.register_buffer("mean", torch.zeros(n_feats))  # [n_feats]
        self.register_buffer("std", torch.ones(n_feats))  # [n_feats]

    @classmethod
    def from_stats_file(
        cls, path: str | os.PathLike, norm_means: bool = True, norm_vars: bool = True, eps: float = 1e-20
    ) -> "GlobalMVN":
        """Read ESPnet's `feats_stats.npz` (count, sum, sum_square) or a Kaldi-style [2, D+1] `.npy`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such feature statistics file")
        try:
            stats = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/BadZipFile for junk
            raise ValueError(f"{path}: not a readable .npz/.npy statistics file: {e}") from e
        if isinstance(stats, np.ndarray):
            if stats.ndim != 2 or stats.shape[0] < 2:
                raise ValueError(f"{path}: Kaldi-style stats must be [2, D+1], got {stats.shape}")
            count = stats[0].flatten()[-1]
            mean = stats[0, :-1] / count
            var = stats[1, :-1] / count - mean * mean
        else:
            missing = [k for k in ("count", "sum", "sum_square") if k not in stats.files]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing} (has {stats.files})")
            count, sum_v, sum_sq = stats["count"], stats["sum"], stats["sum_square"]
            if sum_v.shape != sum_sq.shape or sum_v.ndim != 1:
                raise ValueError(f"{path}: sum {sum_v.shape} and sum_square {sum_sq.shape} must be equal 1-D shapes")
            mean = sum_v / count
            var = sum_sq / count - mean * mean
        if not np.all(np.asarray(count) > 0):
            raise ValueError(f"{path}: frame count must be positive, got {count}")
        std = np.sqrt(np.maximum(var, eps))  # ESPnet floors the variance, not the std
        mvn = cls(mean.shape[0], norm_means, norm_vars)
        mvn.mean.copy_(torch.from_numpy(np.asarray(mean, dtype=np.float64)))
        mvn.std.copy_(torch.from_numpy(np.asarray(std, dtype=np.float64)))
        return mvn

    def forward(self, feats: torch.Tensor, feat_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, D] -> normalized feats [B, T, D] with padded frames 0."""
        if feats.size(-1) != self.mean.numel():
            raise ValueError(f"feats have {feats.size(-1)} features, the statistics have {self.mean.numel()}")
        if self.norm_means:
            feats = feats - self.mean.to(feats.dtype)
        feats = feats.masked_fill(_pad_mask(feat_lengths, feats.size(1))[:, :, None], 0.0)
        if self.norm_vars:
            feats = feats / self.std.to(feats.dtype)
        return feats, feat_lengths


@dataclass
class SpecAugmentConfig:
    """SpecAugment masks (Park et al. 2019); defaults are Dolphin's: 2 freq masks of 0-30, 2 time masks of 0-50.

    Widths are drawn uniformly from [lo, hi) like ESPnet. A time-mask ratio range (OWSM) overrides the
    fixed time-mask widths with [floor(lo*T), floor(hi*T)). Time warping is not implemented.
    """

    num_freq_mask: int = 2
    freq_mask_width_range: tuple[int, int] = (0, 30)
    num_time_mask: int = 2
    time_mask_width_range: tuple[int, int] = (0, 50)
    time_mask_width_ratio_range: tuple[float, float] | None = None
    replace_with_zero: bool = True
    apply_time_warp: bool = False

    def __post_init__(self):
        self.freq_mask_width_range = tuple(self.freq_mask_width_range)
        self.time_mask_width_range = tuple(self.time_mask_width_range)
        if self.time_mask_width_ratio_range is not None:
            self.time_mask_width_ratio_range = tuple(self.time_mask_width_ratio_range)

    @classmethod
    def from_espnet(cls, specaug_conf: dict) -> "SpecAugmentConfig":
        """Build from ESPnet's `specaug_conf` with ESPnet's defaults (apply_time_warp defaults to True there)."""
        conf = dict(specaug_conf or {})
        known = {
            "apply_time_warp", "time_warp_window", "time_warp_mode", "apply_freq_mask", "freq_mask_width_range",
            "num_freq_mask", "apply_time_mask", "time_mask_width_range", "time_mask_width_ratio_range",
            "num_time_mask", "replace_with_zero",
        }  # fmt: skip
        unknown = sorted(set(conf) - known)
        if unknown:
            raise ValueError(f"specaug_conf: unknown keys {unknown}")

        def width(value, default):
            value = default if value is None else value
            return (0, value) if isinstance(value, (int, float)) else tuple(value)

        ratio = conf.get("time_mask_width_ratio_range")
        return cls(
            num_freq_mask=int(conf.get("num_freq_mask", 2)) if conf.get("apply_freq_mask", True) else 0,
            freq_mask_width_range=width(conf.get("freq_mask_width_range"), (0, 20)),
            num_time_mask=int(conf.get("num_time_mask", 2)) if conf.get("apply_time_mask", True) else 0,
            time_mask_width_range=width(conf.get("time_mask_width_range"), (0, 50)) if ratio is None else (0, 1),
            time_mask_width_ratio_range=None if ratio is None else width(ratio, None),
            replace_with_zero=bool(conf.get("replace_with_zero", True)),
            apply_time_warp=bool(conf.get("apply_time_warp", True)),
        )

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpecAugmentConfig":
        """Inverse of to_dict; unknown keys are an error."""
        check_config_keys(cls, d)
        return cls(**d)


def mask_along_axis(feats: torch.Tensor, width_range: tuple[int, int], num_mask: int, dim: int, value) -> torch.Tensor:
    """Fill `num_mask` random bands along `dim` (1 time, 2 freq) of [B, T, F], each of width in [lo, hi)."""
    batch, size = feats.size(0), feats.size(dim)
    # Draw widths then starts with torch.randint in ESPnet's order, so a seeded run masks the same bands.
    widths = torch.randint(width_range[0], width_range[1], (batch, num_mask), device=feats.device)[:, :, None]
    starts = torch.randint(0, max(1, size - int(widths.max())), (batch, num_mask), device=feats.device)[:, :, None]
    pos = torch.arange(size, device=feats.device)[None, None, :]
    mask = ((starts <= pos) & (pos < starts + widths)).any(dim=1)  # [B, size]
    mask = mask[:, :, None] if dim == 1 else mask[:, None, :]
    return feats.masked_fill(mask, value)


class SpecAugment(nn.Module):
    """Random frequency and time masks on log-mel features [B, T, F], in training mode only."""

    def __init__(self, config: SpecAugmentConfig | None = None):
        super().__init__()
        self.config = config or SpecAugmentConfig()

    def forward(self, feats: torch.Tensor, feat_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked feats [B, T, F] (unchanged in eval mode) and the same lengths."""
        c = self.config
        if not self.training:
            return feats, feat_lengths
        if c.apply_time_warp:
            raise NotImplementedError("SpecAugment time warping is not implemented; set apply_time_warp=False")
        if c.num_freq_mask > 0:
            value = 0.0 if c.replace_with_zero else feats.mean()
            feats = mask_along_axis(feats, c.freq_mask_width_range, c.num_freq_mask, 2, value)
        if c.num_time_mask > 0:
            time_range = c.time_mask_width_range
            if c.time_mask_width_ratio_range is not None:
                T = feats.size(1)
                lo = max(0, math.floor(T * c.time_mask_width_ratio_range[0]))
                hi = min(T, math.floor(T * c.time_mask_width_ratio_range[1]))
                time_range = (lo, hi) if hi > lo else None  # ESPnet skips masking when the range is empty
            if time_range is not None:
                value = 0.0 if c.replace_with_zero else feats.mean()
                feats = mask_along_axis(feats, time_range, c.num_time_mask, 1, value)
        return feats, feat_lengths
