"""ASRModel.transcribe on odd and long audio, and the `mm transcribe` path (run_transcribe / cmd_transcribe), on a
tiny random model in our format made here (no ESPnet needed; ESPnet parity is in test_asr.py)."""
import argparse
import io
import json
import re

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
import torch

from decoders.asr_decoder import ASRDecoderConfig
from decoders.tokenizer import SentencePieceTokenizer
from encoders.audio import AudioError
from encoders.ebranchformer import EBranchformerConfig, SpeechTooShortError
from encoders.speech_encoder import SpeechEncoderConfig
from encoders.frontend import FrontendConfig
from mm.models.asr import ASRConfig, ASRModel
from mm.models.vad import speech_windows
from mm.models.formats import load
from mm.apps.transcribe import add_arguments, cmd_transcribe, run_transcribe, timecode

RATE = 16000


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A harmonic tone with moving pitch and loudness, plus a little noise (float32, 16 kHz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    f0 = 140 + 50 * np.sin(2 * np.pi * (0.9 + seed % 3) * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.4 + 0.6 * np.sin(2 * np.pi * (2.5 + seed % 2) * t) ** 2)
    return (0.2 * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random rel-pos E-Branchformer + Transformer decoder with a 40-piece BPE model, saved in our format."""
    d = tmp_path_factory.mktemp("asr")
    (d / "text").write_text("the cat sat on the mat\na dog ran to the park\nshe sells sea shells\nhello world\n" * 4)
    spm.SentencePieceTrainer.train(input=str(d / "text"), vocab_size=40, model_type="bpe", model_prefix=str(d / "bpe"),
                                   character_coverage=1.0, minloglevel=2)
    tok = SentencePieceTokenizer(d / "bpe.model")
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_control(i) and i != tok.unk_id]
    token_list = ["<blank>", "<unk>"] + pieces + ["<sos/eos>"]
    enc = EBranchformerConfig(output_size=32, attention_heads=4, cgmlp_linear_units=64, num_blocks=2, use_ffn=True,
                              macaron_ffn=True, linear_units=48, merge_conv_kernel=31)
    speech = SpeechEncoderConfig(frontend=FrontendConfig(hop_length=160, win_length=400), encoder=enc)
    cfg = ASRConfig(speech=speech, decoder=ASRDecoderConfig(len(token_list), 32, n_heads=4, ffn_dim=64, n_layers=2),
                    token_list=token_list, sos=len(token_list) - 1, eos=len(token_list) - 1, ctc_weight=0.3)
    torch.manual_seed(0)
    model = ASRModel(cfg, tok).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.speech.normalize.mean.fill_(-6.0)
        model.speech.normalize.std.fill_(3.0)
        # centre the CTC head on the mean frame of speech-like input (random encoders vary little over time),
        # with blank ahead, so that the outputs have several tokens and blanks between them
        model.ctc.ctc_lo.weight.mul_(4.0)
        x = torch.from_numpy(speechlike(3.0, 1))[None]
        mean_frame = model.encode(x, torch.tensor([x.shape[1]]))[0][0].mean(0)
        model.ctc.ctc_lo.bias.copy_(-model.ctc.ctc_lo.weight @ mean_frame)
        model.ctc.ctc_lo.bias[0] += 2.5
        model.decoder.output_layer.weight.mul_(4.0)
    model.save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


def write(path, samples, rate=RATE, subtype=None):
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


def test_word_times_are_encoder_frames_of_40_ms(model):
    """Hand-computed: 10 ms hops subsampled 4x make an encoder frame 40 ms; a word runs from its first token's first
    frame to its last token's end frame, plus the offset of its window in the recording."""
    from decoders.ctc import TokenSpan

    assert model.config.frame_shift == pytest.approx(0.04)
    tl = model.config.token_list
    heads = [i for i, t in enumerate(tl) if t.startswith("\u2581") and len(t) > 1]
    tail = next(i for i, t in enumerate(tl) if t[0].isalpha())  # a piece that continues a word
    ids = [heads[0], heads[1], tail]
    spans = [TokenSpan(ids[0], 3, 5, 0.9), TokenSpan(ids[1], 10, 12, 0.8), TokenSpan(ids[2], 12, 20, 0.6)]
    words = model._words(ids, spans, offset=1.5)
    assert [(w.start, w.end) for w in words] == [(1.62, 1.7), (1.9, 2.3)]
    assert [w.text for w in words] == [model.tokens_to_text(ids[:1]).strip(), model.tokens_to_text(ids[1:]).strip()]
    assert words[1].score == pytest.approx((0.8 * 2 + 0.6 * 8) / 10)


# ----------------------------------------------------------------------------------------------- odd audio


def test_int16_int32_float_files_and_arrays(model, tmp_path):
    x = speechlike(1.2, 2)
    want = model.transcribe(x, sample_rate=RATE, decode="ctc")
    assert len(want.token_ids) >= 2
    assert model.transcribe(write(tmp_path / "f.wav", x, subtype="FLOAT"), decode="ctc").token_ids == want.token_ids
    pcm32 = np.round(x.astype(np.float64) * 2**31).astype(np.int32)
    got32 = model.transcribe(write(tmp_path / "i32.wav", pcm32, subtype="PCM_32"), decode="ctc")
    assert got32.token_ids == model.transcribe(pcm32, sample_rate=RATE, decode="ctc").token_ids == want.token_ids
    pcm16 = np.round(x * 32767).astype(np.int16)
    got16 = model.transcribe(write(tmp_path / "i16.wav", pcm16, subtype="PCM_16"), decode="ctc")
    assert got16.token_ids == model.transcribe(pcm16, sample_rate=RATE, decode="ctc").token_ids
    assert got16.duration == 1.2 and got16.source == str(tmp_path / "i16.wav")


def test_stereo_is_mixed_to_mono(model, tmp_path):
    left, right = speechlike(1.0, 3), speechlike(1.0, 4)
    got = model.transcribe(write(tmp_path / "st.wav", np.stack([left, right], 1), subtype="FLOAT"), decode="ctc")
    mono = ((left.astype(np.float64) + right) / 2).astype(np.float32)
    assert got.token_ids == model.transcribe(mono, sample_rate=RATE, decode="ctc").token_ids
    assert got.token_ids != model.transcribe(left, sample_rate=RATE, decode="ctc").token_ids


@pytest.mark.parametrize("rate", [8000, 48000])
def test_other_sample_rates_are_resampled(model, tmp_path, rate):
    import soxr

    x16 = speechlike(1.0, 5)
    x = soxr.resample(x16, RATE, rate, quality="HQ").astype(np.float32)
    got = model.transcribe(write(tmp_path / f"r{rate}.wav", x, rate, "FLOAT"), decode="ctc", timestamps=True)
    assert got.duration == pytest.approx(1.0, abs=1e-3)
    back = soxr.resample(x, rate, RATE, quality="HQ").astype(np.float32)[:RATE]
    assert got.token_ids == model.transcribe(back, sample_rate=RATE, decode="ctc").token_ids
    assert all(0 <= w.start <= w.end <= 1.0 + 1e-6 for w in got.words) and got.words


def test_silence_works(model, tmp_path):
    got = model.transcribe(write(tmp_path / "zero.wav", np.zeros(2 * RATE, np.int16)), decode="joint", beam=3,
                           timestamps=True)
    assert got.duration == 2.0 and len(got.segments) == 1
    assert all(0.0 <= w.start <= w.end <= 2.0 for w in got.words)


def test_short_inputs_follow_the_documented_rule(model, tmp_path):
    # 0.1 s = 1600 samples -> 11 feature frames -> 2 encoder frames: decoded
    got = model.transcribe(write(tmp_path / "short.wav", speechlike(0.1, 6)), decode="joint", beam=2)
    assert got.duration == 0.1 and len(got.segments) == 1
    enc, enc_lengths = model.encode(torch.from_numpy(speechlike(0.1, 6))[None], torch.tensor([1600]))
    assert enc_lengths.tolist() == [2]
    # under 60 ms (6 hops): the subsampling cannot run -> empty transcript from transcribe, an error from encode
    assert model.config.min_samples == 960
    for n in (1, 300, 959):
        tiny = model.transcribe(speechlike(0.1, 6)[:n], sample_rate=RATE, decode="attention")
        assert (tiny.text, tiny.token_ids, tiny.segments) == ("", [], [])
    assert model.transcribe(speechlike(0.1, 6)[:960], sample_rate=RATE, decode="ctc").segments  # exactly 7 frames
    with pytest.raises(SpeechTooShortError, match="has 6 frames.*at least 7"):
        model.encode(torch.zeros(1, 959), torch.tensor([959]))


def test_unusable_audio_gives_clear_errors(model, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file \(0 bytes\)"):
        model.transcribe(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match=r"nosamples\.wav: contains no samples"):
        model.transcribe(write(tmp_path / "nosamples.wav", np.zeros(0, np.int16)))
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n")
    with pytest.raises(AudioError, match=r"notes\.wav: not a readable audio file"):
        model.transcribe(tmp_path / "notes.wav")
    with pytest.raises(AudioError, match="no such audio file"):
        model.transcribe(tmp_path / "missing.wav")
    x = speechlike(1.0, 7)
    x[8000] = np.nan
    with pytest.raises(AudioError, match=r"1 NaN/inf samples \(first at sample 8000, 0\.500 s\)"):
        model.transcribe(x, sample_rate=RATE)
    with pytest.raises(AudioError, match=r"nan\.wav: 1 NaN/inf samples"):
        model.transcribe(write(tmp_path / "nan.wav", x, subtype="FLOAT"))
    with pytest.raises(AudioError, match="needs its sample_rate"):
        model.transcribe(x)
    # a bad file in a list fails before anything is decoded, naming that file
    with pytest.raises(AudioError, match=r"notes\.wav"):
        model.transcribe([write(tmp_path / "ok.wav", speechlike(1.0, 8)), tmp_path / "notes.wav"])
    with pytest.raises(ValueError, match="decode must be one of ctc, attention, joint, rescore"):
        model.transcribe(speechlike(1.0, 8), sample_rate=RATE, decode="greedy")


def test_batched_files_equal_one_by_one(model, tmp_path):
    # equal lengths: no padding in the batch, so batching must not change anything
    waves = [speechlike(1.0, s) for s in (10, 11, 12)]
    batched = model.transcribe(waves, sample_rate=RATE, decode="joint", beam=3, batch_size=3)
    alone = [model.transcribe(w, sample_rate=RATE, decode="joint", beam=3) for w in waves]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in batched}) == 3


# ----------------------------------------------------------------------------------------------- long audio

BURSTS = [(12.0, 13.5), (100.0, 101.2), (598.6, 599.8)]  # isolated speech, seconds
LONG_RUN = (200.0, 270.0)  # 70 s of 2 s talk spurts with 0.5 s pauses: must be cut in the pauses


def long_recording() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """10 minutes of digital silence with a few bursts and one long run; returns samples and the spurts."""
    x = np.zeros(600 * RATE, np.float32)
    spurts = list(BURSTS)
    t = LONG_RUN[0]
    while t + 2.0 <= LONG_RUN[1]:
        spurts.append((t, t + 2.0))
        t += 2.5
    for k, (s, e) in enumerate(spurts):
        seg = speechlike(e - s, k)
        x[int(s * RATE): int(s * RATE) + seg.size] = seg
    return x, sorted(spurts)


def test_speech_windows_of_a_long_recording():
    x, spurts = long_recording()
    windows = [(s / RATE, e / RATE) for s, e in speech_windows(torch.from_numpy(x), RATE, max_window=30.0)]
    assert all(e - s <= 30.0 for s, e in windows)
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:]))  # ordered, disjoint
    for s, e in spurts:  # every spurt lies whole inside one window
        assert sum(ws <= s and e <= we for ws, we in windows) == 1, (s, e)
    cuts = [e for s, e in windows if LONG_RUN[0] < e < LONG_RUN[1]]
    assert len(cuts) >= 2  # the 70 s run needed at least three windows ...
    for c in cuts:  # ... cut where it is silent
        assert not any(s < c < e for s, e in spurts), c
    assert sum(e - s for s, e in windows) < 100  # the minutes of silence are not decoded
    assert speech_windows(torch.zeros(40 * RATE), RATE) == []
    # 45 s of talk with only 0.15 s pauses (bridged) is one run: it is cut at a silent frame 15-30 s in
    talk = np.zeros(46 * RATE, np.float32)
    for k in range(30):
        talk[int((0.5 + 1.5 * k) * RATE): int((1.85 + 1.5 * k) * RATE)] = speechlike(1.35, k)
    cut = [e / RATE for s, e in speech_windows(torch.from_numpy(talk), RATE)][0]
    assert 0.3 + 15 <= cut <= 0.3 + 30 and 1.35 - 1e-6 <= (cut - 0.5) % 1.5 <= 1.5, cut  # the run starts at 0.5 - 0.2 s


def test_long_recording_is_segmented_and_stitched(model, tmp_path):
    x, spurts = long_recording()
    path = write(tmp_path / "long.wav", x, subtype="PCM_16")
    windows = speech_windows(torch.from_numpy(np.round(x * 32767) / 32768).float(), RATE)
    got = model.transcribe(path, decode="ctc", timestamps=True, batch_size=1)
    assert got.duration == 600.0 and len(got.segments) == len(windows)
    words = got.words
    assert len(words) >= 10
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in words)
    for seg, (s, e) in zip(got.segments, windows):  # segment times are recording times inside their window
        assert s / RATE - 1e-6 <= seg.start <= seg.end <= e / RATE + 0.04
        assert all(s / RATE - 1e-6 <= w.start <= w.end <= e / RATE + 0.04 for w in seg.words)
    assert got.text == " ".join(seg.text.strip() for seg in got.segments if seg.text.strip())
    # the window holding 100-101.2 s decoded on its own gives the same words, shifted by its offset
    k = next(i for i, (s, e) in enumerate(windows) if s <= 100 * RATE < e)
    s, e = windows[k]
    clip = sf.read(str(path), dtype="float32", start=s, stop=e)[0]
    alone = model.transcribe(clip, sample_rate=RATE, decode="ctc", timestamps=True)
    assert alone.token_ids == got.segments[k].token_ids and alone.words
    for a, b in zip(alone.words, got.segments[k].words):
        assert (a.text, round(a.start + s / RATE, 3), round(a.end + s / RATE, 3)) == (b.text, b.start, b.end)


def test_segments_are_handed_over_as_they_are_decoded(model, tmp_path, monkeypatch):
    """on_segment gets each window's Segment in (recording, time) order while later windows are still to decode, and
    they are the segments of the returned transcripts (issue 24 item 7: streamed as they are ready)."""
    x, _ = long_recording()
    a = write(tmp_path / "a.wav", x[: 150 * RATE], subtype="PCM_16")  # speech at 12-14 and 100-101 s
    b = write(tmp_path / "b.wav", x[150 * RATE:], subtype="PCM_16")  # 50-80 s (three windows) and 448-450 s
    batches, real = [], type(model).decode_batch
    monkeypatch.setattr(type(model), "decode_batch", lambda self, *args, **kw: batches.append(1) or real(self, *args, **kw))
    seen = []
    got = model.transcribe([a, b], decode="ctc", batch_size=2, on_segment=lambda i, seg: seen.append((i, seg, len(batches))))
    assert [(i, seg) for i, seg, _ in seen] == [(i, seg) for i, t in enumerate(got) for seg in t.segments]
    assert [len(t.segments) for t in got] == [2, 4] and len(batches) == 3
    assert [n for _, _, n in seen] == [min(k // 2 + 1, len(batches)) for k in range(len(seen))]  # after its own batch


# ----------------------------------------------------------------------------------------------- mm transcribe

SRT_CUE = re.compile(r"^(\d+)\n(\d\d):([0-5]\d):([0-5]\d),(\d{3}) --> (\d\d):([0-5]\d):([0-5]\d),(\d{3})\n(.+)$")


def seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_run_transcribe_formats(model_dir, tmp_path):
    a = write(tmp_path / "a.wav", speechlike(2.0, 20), subtype="PCM_16")
    b = write(tmp_path / "b.flac", speechlike(1.5, 21), subtype="PCM_16")

    out = io.StringIO()
    results = run_transcribe([a, b], str(model_dir), decode="joint", beam=3, fmt="json", timestamps=True, out=out)
    doc = json.loads(out.getvalue())
    assert [d["file"] for d in doc] == [str(a), str(b)]
    for d, r in zip(doc, results):
        assert d["text"] == r.text and d["duration"] == r.duration and d["tokens"] == r.tokens
        words = [w for s in d["segments"] for w in s["words"]]
        assert words and all(0 <= w["start"] <= w["end"] <= d["duration"] + 0.04 for w in words)

    out = io.StringIO()
    run_transcribe([a], str(model_dir), decode="ctc", fmt="srt", out=out)
    cues = out.getvalue().strip().split("\n\n")
    assert cues
    prev_end = 0.0
    for n, cue in enumerate(cues, 1):
        m = SRT_CUE.match(cue)
        assert m, cue
        start, end = seconds(*m.group(2, 3, 4, 5)), seconds(*m.group(6, 7, 8, 9))
        assert int(m.group(1)) == n and prev_end <= start < end <= 2.04
        prev_end = end

    out = io.StringIO()
    res = run_transcribe([a, b], str(model_dir), decode="ctc", fmt="text", out=out)
    assert out.getvalue() == f"{a}: {res[0].text.strip()}\n{b}: {res[1].text.strip()}\n"
    out = io.StringIO()
    run_transcribe([a], str(model_dir), decode="ctc", fmt="text", timestamps=True, out=out)
    for line in out.getvalue().splitlines():
        assert re.match(r"^\[\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\] \S", line), line


def test_cli_entry_point(model_dir, tmp_path, capsys):
    a = write(tmp_path / "talk.wav", speechlike(1.5, 30), subtype="PCM_16")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(a), "--model", str(model_dir), "--decode", "rescore", "--beam", "4", "--timestamps",
                         "--format", "json"])
    assert cmd_transcribe(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["file"] == str(a) and doc[0]["segments"][0]["words"]
    args = p.parse_args([str(a), "--model", str(model_dir), "--format", "srt", "--out-dir", str(tmp_path / "out")])
    assert cmd_transcribe(args) == 0
    assert SRT_CUE.match((tmp_path / "out" / "talk.srt").read_text().strip().split("\n\n")[0])
    with pytest.raises(ValueError, match=r"test_cli_entry_point0: no config.json \(nor an ESPnet config.yaml"):
        run_transcribe([a], str(tmp_path))


def test_timecode():
    assert timecode(0) == "00:00:00,000"
    assert timecode(3723.4567) == "01:02:03,457"
    assert timecode(59.9996, ".") == "00:01:00.000"


def test_out_dir_refuses_two_inputs_with_one_output_name(model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a" / "question.flac", speechlike(1.0, 1))
    b = write(tmp_path / "b" / "question.wav", speechlike(1.0, 2))
    with pytest.raises(ValueError, match=r"question.flac and .*question.wav would both write question.txt"):
        run_transcribe([str(a), str(b)], str(model_dir), out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was decoded or written


def test_a_lexicon_makes_an_espnet_style_model_spell_its_words(model_dir, tmp_path):
    """--lexicon with an ESPnet-style model: the CTC beam search (no longer greedy) and the joint search write only the
    list's words (the random model writes others without it); rescore takes none."""
    a = write(tmp_path / "a.wav", speechlike(3.0, 1))
    lexicon = {"the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "she", "sells", "sea", "shells", "hello"}
    (tmp_path / "words.txt").write_text("\n".join(sorted(lexicon)) + "\n")
    plain = run_transcribe([a], str(model_dir), decode="ctc", out=io.StringIO())[0].text
    assert not set(plain.split()) <= lexicon, plain
    for decode in ("ctc", "joint"):
        text = run_transcribe([a], str(model_dir), decode=decode, beam=4, lexicon=str(tmp_path / "words.txt"),
                              out=io.StringIO())[0].text
        assert text.split() and set(text.split()) <= lexicon, (decode, text)
    with pytest.raises(ValueError, match="a lexicon acts in the beam searches"):
        run_transcribe([a], str(model_dir), decode="rescore", lexicon=str(tmp_path / "words.txt"))


def test_one_bad_file_does_not_cost_the_others(model_dir, tmp_path):
    good = [write(tmp_path / f"talk{k}.wav", speechlike(1.2, k)) for k in range(2)]
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(ValueError, match=r"1 of 3 files failed \(the others were written\): .*notes.wav: not a "
                                         r"readable audio file"):
        run_transcribe([str(good[0]), str(bad), str(good[1])], str(model_dir), out_dir=str(tmp_path / "out"))
    alone = [run_transcribe([str(g)], str(model_dir), out=io.StringIO())[0].text for g in good]
    assert [(tmp_path / "out" / f"talk{k}.txt").read_text().strip() for k in range(2)] == [t.strip() for t in alone]
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_an_asr_model_refuses_images_and_chat_clearly(model):
    with pytest.raises(ValueError, match="this ASR model has no image encoder, so it cannot caption"):
        model.caption("photo.png")
    with pytest.raises(ValueError, match="this ASR model cannot chat"):
        model.chat([{"role": "user", "content": "hi"}])


def test_a_recording_over_max_minutes_is_refused_before_decoding(model, tmp_path, monkeypatch):
    """The Python API's limit (issue 24): 240 minutes by default, from the header before any file is decoded (a list:
    before the good file ahead of it); headerless PCM, whose length only the reader knows, as it is read."""
    from tests.mm.test_issue24_max_minutes import write_hours

    hours = write_hours(tmp_path / "hours.wav", 241)
    ok = write(tmp_path / "ok.wav", speechlike(1.0, 3))
    raw = tmp_path / "talk.raw"
    raw.write_bytes((speechlike(2.0, 4) * 32767).astype("<i2").tobytes())
    assert model.transcribe(raw, sample_rate=RATE, max_minutes=None).duration == 2.0  # no limit: it is read
    with monkeypatch.context() as m:
        m.setattr(sf.SoundFile, "read", lambda self, *a, **k: pytest.fail(f"{self.name} was decoded"))
        with pytest.raises(AudioError) as e:
            model.transcribe([ok, hours])
        assert str(e.value) == f"{hours}: 14460.0 s (241.0 min) is longer than the limit of 240 min (max_minutes)"
        with pytest.raises(AudioError) as e:
            model.transcript(str(ok), max_minutes=0.01)
        assert str(e.value) == f"{ok}: 1.0 s (0.0 min) is longer than the limit of 0.01 min (max_minutes)"
        with pytest.raises(AudioError) as e:
            model.transcribe(raw, sample_rate=RATE, max_minutes=1 / 60)
        assert str(e.value) == f"{raw}: 2.0 s is longer than the limit of 1 s"
