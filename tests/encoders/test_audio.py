"""Reading audio: formats, sample types, channels, rates and the files that must fail clearly."""
import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.audio import BLOCK_FRAMES, AudioError, audio_seconds, load_audio
from encoders.frontend import LogMelFrontend


def tone(freq, rate, seconds, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


FORMATS = [
    ("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3"),
]  # fmt: skip


@pytest.mark.parametrize("fmt,subtype,ext", FORMATS)
def test_formats_read_back_the_tone(tmp_path, fmt, subtype, ext):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, tone(440, 16000, 1.0), 16000, format=fmt, subtype=subtype)
    audio, rate = load_audio(path)
    assert rate == 16000 and audio.dtype == torch.float32 and audio.dim() == 1
    # lossy codecs pad and shift a little: compare the spectrum peak and the level, not sample by sample
    assert abs(audio.numel() - 16000) < 2000
    spectrum = np.abs(np.fft.rfft(audio.numpy()))
    peak_hz = spectrum.argmax() * 16000 / audio.numel()
    assert abs(peak_hz - 440) < 3
    rms = float(audio[2000:14000].pow(2).mean().sqrt())
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.03


def test_int16_int32_and_float_files_scale_to_the_same_waveform(tmp_path):
    x = tone(300, 16000, 0.5, amplitude=0.8)
    ints16 = np.round(x * 32767).astype(np.int16)
    ints32 = np.round(x.astype(np.float64) * (2**31 - 1)).astype(np.int32)
    sf.write(tmp_path / "i16.wav", ints16, 16000, subtype="PCM_16")
    sf.write(tmp_path / "i32.wav", ints32, 16000, subtype="PCM_32")
    sf.write(tmp_path / "f32.wav", x, 16000, subtype="FLOAT")
    a16, _ = load_audio(tmp_path / "i16.wav")
    a32, _ = load_audio(tmp_path / "i32.wav")
    af, _ = load_audio(tmp_path / "f32.wav")
    assert torch.allclose(a16, torch.from_numpy(ints16 / 32768.0).float(), atol=1e-7)
    assert torch.allclose(a32, torch.from_numpy(ints32 / 2.0**31).float(), atol=1e-7)
    assert torch.equal(af, torch.from_numpy(x))
    assert (a16 - af).abs().max() < 1e-4 and (a32 - af).abs().max() < 1e-6


def test_integer_and_float_arrays(tmp_path):
    x = tone(300, 16000, 0.25)
    ints16 = np.round(x * 32767).astype(np.int16)
    got, rate = load_audio(ints16, sample_rate=16000)
    assert rate == 16000 and torch.allclose(got, torch.from_numpy(ints16 / 32768.0).float())
    got32, _ = load_audio(ints16.astype(np.int32) * 65536, sample_rate=16000)
    assert torch.allclose(got32, got)
    gott, _ = load_audio(torch.from_numpy(x.astype(np.float64)), sample_rate=16000)
    assert torch.equal(gott, torch.from_numpy(x))
    with pytest.raises(AudioError, match="needs its sample_rate"):
        load_audio(x)


def test_stereo_is_averaged_to_mono(tmp_path):
    left = tone(300, 16000, 0.5)
    right = -0.5 * left + 0.1
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio, _ = load_audio(tmp_path / "stereo.wav")
    assert torch.allclose(audio, torch.from_numpy((left + right) / 2), atol=1e-7)
    # arrays: [S, C] and [C, S] both work (the shorter axis is channels)
    a, _ = load_audio(np.stack([left, right], axis=1), sample_rate=16000)
    b, _ = load_audio(np.stack([left, right], axis=0), sample_rate=16000)
    assert torch.allclose(a, audio) and torch.allclose(b, audio)


@pytest.mark.parametrize("rate", [8000, 48000, 22050])
def test_resampling_to_16k_keeps_the_tone(tmp_path, rate):
    sf.write(tmp_path / "t.wav", tone(440, rate, 1.0), rate, subtype="FLOAT")
    audio, out_rate = load_audio(tmp_path / "t.wav")
    assert out_rate == 16000 and audio.numel() == 16000
    want = tone(440, 16000, 1.0)
    # a band-limited resampler reproduces a 440 Hz tone almost exactly away from the edges
    assert np.abs(audio.numpy()[400:-400] - want[400:-400]).max() < 2e-3


def test_silence_and_short_audio_give_features(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.int16), 16000, subtype="PCM_16")
    audio, _ = load_audio(tmp_path / "silence.wav")
    assert torch.count_nonzero(audio) == 0
    feats, lengths = LogMelFrontend()(audio[None], torch.tensor([audio.numel()]))
    assert lengths.tolist() == [101]
    assert torch.allclose(feats, torch.full_like(feats, float(np.log(1e-10))))  # the clamp floor, finite

    sf.write(tmp_path / "short.wav", tone(500, 16000, 0.1), 16000)
    short, _ = load_audio(tmp_path / "short.wav")
    feats, lengths = LogMelFrontend()(short[None], torch.tensor([short.numel()]))
    assert short.numel() == 1600 and lengths.tolist() == [11] and torch.isfinite(feats).all()


def test_ten_minute_file_loads_and_featurizes_like_its_pieces(tmp_path):
    rate, seconds = 16000, 600
    rng = np.random.default_rng(0)
    samples = (rng.standard_normal(rate * seconds) * 3000).clip(-32768, 32767).astype(np.int16)
    sf.write(tmp_path / "long.wav", samples, rate, subtype="PCM_16")
    audio, _ = load_audio(tmp_path / "long.wav")
    assert audio.numel() == rate * seconds
    frontend = LogMelFrontend()
    feats, lengths = frontend(audio[None], torch.tensor([audio.numel()]))
    assert feats.shape == (1, 60001, 80) and lengths.tolist() == [60001]
    # a frame depends only on its own 512 samples: frames deep inside the file equal those of an excerpt
    start = 540 * rate  # minute 9
    excerpt, _ = frontend(audio[None, start : start + rate], torch.tensor([rate]))
    hop = 160
    first = start // hop
    assert (feats[0, first + 2 : first + 99] - excerpt[0, 2:99]).abs().max() < 1e-3


def test_empty_file_fails_clearly(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "noframes.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"noframes\.wav: contains no samples"):
        load_audio(tmp_path / "noframes.wav")


def test_text_file_named_wav_fails_clearly(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav: not a readable audio file"):
        load_audio(tmp_path / "notes.wav")


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.flac: no such audio file"):
        load_audio(tmp_path / "nope.flac")


def test_nan_and_inf_samples_fail_clearly(tmp_path):
    x = tone(300, 16000, 0.5)
    x[1234] = np.nan
    x[5000] = np.inf
    sf.write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: 2 NaN/inf samples \(first at sample 1234"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match="NaN/inf"):
        load_audio(torch.tensor([0.0, float("inf")]), sample_rate=16000)


def test_sample_rate_that_contradicts_the_file(tmp_path):
    sf.write(tmp_path / "t.wav", tone(300, 8000, 0.2), 8000)
    with pytest.raises(AudioError, match="the file says 8000 Hz but sample_rate=16000"):
        load_audio(tmp_path / "t.wav", sample_rate=16000)


def test_resampler_is_librosa_soxr_hq():
    import librosa

    x = np.random.default_rng(0).standard_normal(12345).astype(np.float32) * 0.1
    for rate in (8000, 44100, 48000):
        got, _ = load_audio(x, sample_rate=rate)
        want = librosa.resample(x, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
        assert got.shape == want.shape and np.abs(got.numpy() - want).max() < 1e-6


def test_unknown_container_falls_back_to_librosa_and_fails_clearly(tmp_path):
    (tmp_path / "clip.m4a").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(AudioError, match=r"clip\.m4a: not a readable audio file \(libsndfile: .*librosa"):
        load_audio(tmp_path / "clip.m4a")


def test_headerless_pcm_needs_its_rate_and_then_reads_like_the_wav(tmp_path):
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000) * 32767).astype("<i2")
    (tmp_path / "tone.raw").write_bytes(tone.tobytes())
    with pytest.raises(AudioError, match=r"tone.raw: headerless PCM has no sample rate"):
        load_audio(tmp_path / "tone.raw")
    raw, _ = load_audio(tmp_path / "tone.raw", sample_rate=8000)
    sf.write(str(tmp_path / "tone.wav"), tone, 8000, subtype="PCM_16")
    wav, _ = load_audio(tmp_path / "tone.wav")
    assert torch.equal(raw, wav)


def test_audio_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """30 minutes of 48 kHz stereo silence compress to a small FLAC; with a limit, reading stops at the header (or
    after the limit's worth of samples when the header does not say), never decoding the half hour."""
    import soundfile

    path = tmp_path / "bomb.flac"
    with soundfile.SoundFile(str(path), "w", 48000, 2, "PCM_16") as f:
        block = np.zeros((48000 * 60, 2), dtype=np.int16)
        for _ in range(30):
            f.write(block)
    assert path.stat().st_size < 2_000_000
    reads = []
    real_read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, frames=-1, **kw: reads.append(frames) or
                        real_read(self, frames, **kw))
    with pytest.raises(AudioError, match=r"bomb.flac: 1800.0 s is longer than the limit of 30 s"):
        load_audio(path, max_seconds=30)
    assert reads == []  # refused from the header
    assert audio_seconds(path) == 1800.0  # the header, for `mm transcribe --max-minutes`
    sf.write(str(tmp_path / "ok.wav"), tone(440, 16000, 2.0), 16000)
    wave, _ = load_audio(tmp_path / "ok.wav", max_seconds=30)  # under the limit: read in blocks
    assert wave.shape == (32000,) and reads == [BLOCK_FRAMES]
    with pytest.raises(AudioError, match=r"longer than the limit of 1 s"):
        load_audio(np.zeros(32000, np.float32), sample_rate=16000, max_seconds=1)


@pytest.mark.parametrize("rate,channels,subtype,ext,blocks", [
    (44100, 3, "FLOAT", "wav", 3), (48000, 2, "PCM_16", "flac", 3), (16000, 2, "PCM_24", "wav", 3),
    (48000, 2, "FLOAT", "wav", 2),  # a whole number of blocks: the last read is empty and flushes the resampler
])
def test_block_wise_reading_equals_the_whole_file_path(tmp_path, monkeypatch, rate, channels, subtype, ext, blocks):
    """Files are decoded BLOCK_FRAMES at a time, averaged to mono and stream-resampled per block: bit for bit the
    whole-file result (soundfile's float32 samples, channel mean in float64, librosa's soxr_hq resample)."""
    import librosa

    frames = blocks * BLOCK_FRAMES + (77 if blocks == 3 else 0)
    x = (0.3 * np.random.default_rng(rate).standard_normal((frames, channels))).clip(-1, 1)
    path = tmp_path / f"multi.{ext}"
    sf.write(path, x.astype(np.float32), rate, subtype=subtype)
    whole, _ = sf.read(path, dtype="float32", always_2d=True)
    want = whole.mean(axis=1, dtype=np.float64).astype(np.float32)
    if rate != 16000:
        want = librosa.resample(want, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    reads = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, **kw: reads.append(frames) or
                        real_read(self, frames, **kw))
    got, _ = load_audio(path)
    assert reads == [BLOCK_FRAMES] * (blocks + 1)  # never the whole file at once
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))
    assert torch.equal(got, load_audio(whole, sample_rate=rate)[0])  # the array path, which takes it whole


def test_nan_in_a_later_block_is_counted_from_the_file_start(tmp_path):
    x = np.zeros((2 * BLOCK_FRAMES, 2), np.float32)
    x[BLOCK_FRAMES + 5, 1] = np.nan
    x[-1, 0] = np.inf
    sf.write(tmp_path / "nan.wav", x, 48000, subtype="FLOAT")
    first = BLOCK_FRAMES + 5
    with pytest.raises(AudioError, match=rf"nan\.wav: 2 NaN/inf samples \(first at sample {first}, 1\.365 s\)"):
        load_audio(tmp_path / "nan.wav")
