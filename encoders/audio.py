"""Read speech into a mono float32 waveform at 16 kHz, with clear errors for files that are not usable audio.

Files are read with `soundfile` (libsndfile: wav, flac, ogg, mp3 with libsndfile >= 1.1, ...); other
containers (m4a, ...) fall back to `librosa.load`, which needs ffmpeg through audioread. Resampling is
soxr's "HQ" band-limited resampler, i.e. `librosa.resample(res_type="soxr_hq")` (librosa's default).
Dolphin's own reader pipes through ffmpeg to int16, so its samples differ from ours by quantization noise.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
MAX_CHANNELS = 64  # more "channels" than this means the array is laid out the wrong way round


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, or with NaN/inf samples; the message names the source."""


def _to_float(samples: np.ndarray, source: str) -> np.ndarray:
    """Integer PCM to [-1, 1) floats by its full scale; floats are kept as they are."""
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    if samples.dtype.kind == "i":
        return (samples / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    if samples.dtype == np.uint8:  # 8-bit WAV convention: unsigned with 128 as zero
        return ((samples.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    raise AudioError(f"{source}: unsupported sample type {samples.dtype} (expected int16, int32 or float)")


def _to_mono(samples: np.ndarray, source: str) -> np.ndarray:
    """[S] or [S, C] / [C, S] (the shorter axis is channels) to [S] by averaging channels."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"{source}: expected a waveform of shape [S] or [S, C], got shape {tuple(samples.shape)}")
    channel_axis = 1 if samples.shape[1] <= samples.shape[0] else 0
    if samples.shape[channel_axis] > MAX_CHANNELS:
        raise AudioError(
            f"{source}: shape {tuple(samples.shape)} has more than {MAX_CHANNELS} channels on its shorter axis; "
            "pass [S] or [S, C]"
        )
    return samples.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)


RAW_SUFFIXES = (".raw", ".pcm")  # headerless PCM: 16-bit signed little-endian mono at a rate the caller gives


BLOCK_FRAMES = 1 << 16  # frames decoded at a time: 1.4 s at 48 kHz, 512 KB for stereo float32


def _check_length(source: str, frames: int, rate: int, max_seconds: float | None) -> None:
    """AudioError when `frames` at `rate` run past `max_seconds` (+ one frame)."""
    if max_seconds is not None and frames > int(max_seconds * rate) + 1:
        raise AudioError(f"{source}: {frames / rate:.1f} s is longer than the limit of {max_seconds:g} s")


def _stream_mono(path: Path, target_rate: int, max_seconds: float | None, **raw) -> tuple[np.ndarray, int]:
    """(mono float32 [S'] at target_rate, the file's rate), decoded BLOCK_FRAMES at a time: each block is averaged
    to mono and fed to soxr's stream resampler (bit-identical to its one-shot resample), so the peak memory is the
    result plus a block, not the multichannel whole. A header longer than `max_seconds` fails before decoding;
    content that runs past it fails as soon as it does (a compressed file can hold hours of silence)."""
    import soundfile as sf

    source = str(path)
    with sf.SoundFile(source, **raw) as f:
        rate = int(f.samplerate)
        if rate <= 0:
            raise AudioError(f"{source}: sample rate must be positive, got {rate}")
        _check_length(source, f.frames, rate, max_seconds)
        stream = None
        if rate != target_rate:
            import soxr

            stream = soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
        out = np.zeros(int(np.ceil(max(f.frames, 0) * target_rate / rate)) + 1, np.float32)  # grows if the header lied
        n_in = n_out = n_bad = 0
        first_bad = -1
        while True:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)  # [B, C]
            last = len(block) < BLOCK_FRAMES
            mono = block.mean(axis=1, dtype=np.float64).astype(np.float32)  # as _to_mono
            bad = ~np.isfinite(mono)
            if bad.any():
                first_bad = n_in + int(np.flatnonzero(bad)[0]) if n_bad == 0 else first_bad
                n_bad += int(bad.sum())
            n_in += len(block)
            _check_length(source, n_in, rate, max_seconds)
            if n_bad == 0:
                chunk = mono if stream is None else stream.resample_chunk(mono, last=last)
                if n_out + len(chunk) > len(out):
                    out = np.concatenate([out, np.zeros(max(len(chunk), len(out) // 2), np.float32)])
                out[n_out:n_out + len(chunk)] = chunk
                n_out += len(chunk)
            if last:
                break
    if n_in == 0:
        raise AudioError(f"{source}: contains no samples")
    if n_bad:
        raise AudioError(f"{source}: {n_bad} NaN/inf samples (first at sample {first_bad}, {first_bad / rate:.3f} s)")
    n = n_in if stream is None else int(np.ceil(n_in * target_rate / rate))  # librosa's fix_length
    if len(out) < n:
        out = np.concatenate([out, np.zeros(n - len(out), np.float32)])
    return out[:n], rate


def audio_seconds(path: str | os.PathLike) -> float | None:
    """A file's duration from its header (libsndfile), without decoding it; None when libsndfile cannot tell
    (headerless PCM, containers read through librosa)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, TypeError):  # LibsndfileError is a RuntimeError; TypeError: headerless
        return None
    return info.frames / info.samplerate if info.samplerate > 0 else None


MAX_MINUTES = 240.0  # longest recording transcribed by default: transcript(max_minutes=), mm transcribe --max-minutes


def too_long(path: str | os.PathLike, max_minutes: float | None, option: str = "max_minutes") -> str | None:
    """Why the file `path` is refused for its length by its header (nothing is decoded), naming the file, its length,
    the limit and the `option` that sets it; None when it is within `max_minutes`, when there is no limit (None) or
    when the header does not tell (headerless PCM, librosa containers: load_audio's max_seconds stops those)."""
    seconds = audio_seconds(path) if max_minutes is not None else None
    if seconds is None or seconds <= max_minutes * 60:
        return None
    return (f"{path}: {seconds:.1f} s ({seconds / 60:.1f} min) is longer than the limit of {max_minutes:g} min "
            f"({option})")


def check_minutes(sources: list, max_minutes: float | None, option: str = "max_minutes") -> float | None:
    """The limit in seconds to decode `sources` with (load_audio's max_seconds; None: no limit), after checking
    `max_minutes` and the header of every file path among `sources` before any is decoded: AudioError (`too_long`'s
    message) for the first one that is longer. Arrays and files whose header does not tell are checked as they are
    read, by load_audio(max_seconds=)."""
    if max_minutes is None:
        return None
    if not max_minutes > 0:
        raise ValueError(f"{option} must be > 0 (None: no limit), got {max_minutes}")
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and (why := too_long(source, max_minutes, option)):
            raise AudioError(why)
    return max_minutes * 60


def _read_file(path: Path, sample_rate: int | None, target_rate: int,
               max_seconds: float | None) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """(mono float32 at target_rate, None, file rate) for files libsndfile reads, decoded block-wise; (None, samples
    [S, C], rate) from librosa for other containers (m4a, ...). `sample_rate`: a headerless file's rate."""
    source = str(path)
    if not path.is_file():
        raise AudioError(f"{source}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{source}: empty file (0 bytes)")
    if path.suffix.lower() in RAW_SUFFIXES:
        if sample_rate is None:
            raise AudioError(f"{source}: headerless PCM has no sample rate; pass sample_rate= (mm transcribe: "
                             "--sample-rate) to read it as 16-bit signed little-endian mono, or convert it to WAV "
                             "(sox -r RATE -e signed -b 16 -c 1 in.raw out.wav)")
        wave, rate = _stream_mono(path, target_rate, max_seconds, samplerate=int(sample_rate), channels=1,
                                  subtype="PCM_16", endian="LITTLE", format="RAW")
        return wave, None, rate
    try:
        wave, rate = _stream_mono(path, target_rate, max_seconds)
        return wave, None, rate
    except RuntimeError as e:  # soundfile.LibsndfileError is a RuntimeError
        sf_error = e
    # libsndfile did not recognise the container: try librosa's audioread (ffmpeg) path for m4a/aac/...,
    # but only for extensions libsndfile does not own, so a broken .wav reports libsndfile's reason.
    if path.suffix.lower().lstrip(".") in {"wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "au", "caf"}:
        raise AudioError(f"{source}: not a readable audio file (libsndfile: {sf_error})")
    try:
        import librosa

        with warnings.catch_warnings():  # librosa warns that soundfile failed: we know, and say so below
            warnings.simplefilter("ignore")
            samples, rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    except Exception as e:  # audioread raises its own family of errors (NoBackendError, ...)
        raise AudioError(
            f"{source}: not a readable audio file (libsndfile: {sf_error}; librosa/audioread: {e!r})"
        ) from e
    samples = samples.T if samples.ndim == 2 else samples[:, None]  # librosa gives [C, S]
    return None, samples, int(rate)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float32 waveform like librosa.resample(res_type="soxr_hq"); a no-op when the rates agree."""
    if orig_rate == target_rate:
        return samples
    # soxr directly (librosa's own backend for soxr_hq, installed with it): importing librosa.resample
    # pulls in numba and costs seconds, the resampling itself milliseconds
    import soxr

    out = soxr.resample(samples, orig_rate, target_rate, quality="HQ").astype(np.float32)
    n = int(np.ceil(samples.shape[-1] * target_rate / orig_rate))  # librosa's fix_length
    return out[:n] if out.shape[-1] >= n else np.pad(out, (0, n - out.shape[-1]))


def load_audio(
    path_or_array: str | os.PathLike | np.ndarray | torch.Tensor,
    sample_rate: int | None = None,
    target_rate: int = SAMPLE_RATE,
    max_seconds: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Read a file (or take an array with its `sample_rate`) as a mono float32 tensor [S] at `target_rate`.

    A headerless `.raw`/`.pcm` file is 16-bit signed little-endian mono PCM at `sample_rate`, which it needs.
    Files libsndfile reads are decoded BLOCK_FRAMES at a time (mono and resampled as they come: the peak memory is
    the result plus a block); arrays and other containers whole, with the same numbers.
    `max_seconds`: longer audio is an AudioError, raised (for files libsndfile reads) before more than that is decoded.
    """
    if isinstance(path_or_array, (str, os.PathLike)):
        path = Path(path_or_array)
        source = str(path)
        wave, samples, rate = _read_file(path, sample_rate, target_rate, max_seconds)
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"{source}: the file says {rate} Hz but sample_rate={sample_rate} was given")
        if wave is not None:  # read block-wise: already mono, finite and at target_rate
            return torch.from_numpy(wave), target_rate
    else:
        source = f"array of shape {tuple(path_or_array.shape)}"
        if sample_rate is None:
            raise AudioError(f"{source}: a waveform array needs its sample_rate")
        samples = path_or_array.detach().cpu().numpy() if isinstance(path_or_array, torch.Tensor) else path_or_array
        samples = np.asarray(samples)
        rate = int(sample_rate)
    if rate <= 0:
        raise AudioError(f"{source}: sample rate must be positive, got {rate}")
    if samples.size == 0:
        raise AudioError(f"{source}: contains no samples")
    _check_length(source, max(samples.shape), rate, max_seconds)  # arrays, and the librosa fallback
    samples = _to_mono(_to_float(samples, source), source)
    bad = ~np.isfinite(samples)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise AudioError(
            f"{source}: {int(bad.sum())} NaN/inf samples (first at sample {first}, {first / rate:.3f} s)"
        )
    samples = resample(samples, rate, target_rate)
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), target_rate
