"""The shipped multimodal model (mm/models/tiny, `mm train --recipe tiny`) through the Python API, the `mm` command
line and the demos, checked against the ground truth its bundled examples were made from (mm/examples/)."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mm
from mm.assets import EXAMPLES_DIR, default_multimodal_dir, example
from mm.eval.metrics import wer
from mm.models.fusion import FusionModel
from mm.models.processor import InputError
from mm.data.scenes import COLOURS, SHAPES

TRUTH = json.loads((EXAMPLES_DIR / "examples.json").read_text())
ROOT = Path(__file__).resolve().parents[2]


def mm_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mm.apps.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def model():
    m = mm.load()
    assert isinstance(m, FusionModel)
    return m


def is_caption(text: str) -> bool:
    """A sentence of the scene grammar: 'there is ...' / 'there are N shapes: ...', ending with a full stop."""
    return text.startswith(("there is a ", "there are ")) and text.endswith(".") and any(s in text for s in SHAPES)


def test_default_model_hears_and_answers(model):
    scene, question = str(example("scene.png")), str(example("question.wav"))
    assert is_caption(model.caption(scene))
    text = model.transcribe(question)
    assert wer([text], [TRUTH["question.wav"]["text"]]) <= 20, text
    assert "".join(model.transcribe(question, stream=True)) == text
    spoken = [{"role": "user", "content": [{"type": "image", "image": scene}, {"type": "audio", "audio": question}]}]
    assert model.chat(spoken) in COLOURS  # it heard a colour question (which colour: see the README's figures)
    typed = [{"role": "user", "content": "<image>\n" + TRUTH["question.wav"]["text"]}]
    assert "".join(model.chat(typed, images=[scene], stream=True)) == model.chat(typed, images=[scene])  # no leading space
    assert "".join(model.caption(scene, stream=True)) == model.caption(scene)


def test_transcript_times_the_words(model):
    t = model.transcript(str(example("question.wav")))
    assert [w.text for w in t.words] == t.text.split()
    times = [x for w in t.words for x in (w.start, w.end)]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= t.duration


def test_word_times_move_with_the_audio(model, tmp_path):
    """Word times are times in the recording: 0.5 s more silence before the clip moves every word 0.5 s later,
    within one 40 ms encoder frame plus rounding. Both versions have silence first (0.2 s and 0.7 s): the clip as
    recorded starts on its first word, whose alignment the recording's edge squeezes. (Some silences change what
    this small model hears: 0.3 s before this clip make it hear "at the bottom right" first, 0.6 s "the".) The first
    word's start is not compared: the CTC spike of a recording's first word falls anywhere in the silence before it
    (0.02-0.12 s early over 0.2-1.0 s of silence); its end and every later word's times are."""
    wave, rate = sf.read(str(example("question.wav")), dtype="float32")
    for name, seconds in (("first.wav", 0.2), ("later.wav", 0.7)):
        sf.write(str(tmp_path / name), np.concatenate([np.zeros(round(rate * seconds), np.float32), wave]), rate)
    first, later = model.transcript(str(tmp_path / "first.wav")), model.transcript(str(tmp_path / "later.wav"))
    assert [w.text for w in later.words] == [w.text for w in first.words] and first.words
    for k, (a, b) in enumerate(zip(first.words, later.words)):
        assert abs(b.end - a.end - 0.5) <= 0.05 and (k == 0 or abs(b.start - a.start - 0.5) <= 0.05), (a, b)


def test_transcribe_decode_options_act_on_the_multimodal_model(model, tmp_path):
    """`--decode attention --beam 1` is the decoder's greedy reply (the chat path); ctc, attention and joint each give
    their own reading of a sentence outside the training grammar; rescore is refused with a message."""
    import io

    from mm.apps.transcribe import run_transcribe
    from mm.data.speech_data import synthesize

    path = str(tmp_path / "odd.wav")
    sf.write(path, synthesize("the blue square is next to a green triangle", "en-us").numpy(), 16000)
    text = {d: run_transcribe([path], None, decode=d, beam=b, out=io.StringIO())[0].text
            for d, b in (("ctc", 4), ("attention", 1), ("joint", 4))}
    assert text["attention"] == model.transcribe(path, ctc_weight=0)
    assert len(set(text.values())) == 3, text
    with pytest.raises(ValueError, match="--decode rescore: the multimodal model decodes with ctc"):
        run_transcribe([path], None, decode="rescore")


def test_a_lexicon_makes_the_search_spell_only_its_words(model, tmp_path):
    """`mm transcribe --lexicon FILE`: everyday words the CTC head misspells alone ("pleays opend the small windo")
    come out as words of the list, closer to what was said; a missing list or an ESPnet-style model is refused."""
    import io

    from mm.apps.transcribe import run_transcribe
    from mm.data.speech_data import synthesize
    from mm.data.words import SCENE_WORDS, common_words

    said = "please open the small window"
    path, words = str(tmp_path / "said.wav"), tmp_path / "words.txt"
    sf.write(path, synthesize(said, "en-us").numpy(), 16000)
    lexicon = set(common_words()) | set(SCENE_WORDS)
    words.write_text("\n".join(sorted(lexicon)) + "\n")
    plain = run_transcribe([path], None, decode="ctc", beam=16, out=io.StringIO())[0].text
    spelled = run_transcribe([path], None, decode="ctc", beam=16, lexicon=str(words), out=io.StringIO())[0].text
    assert not set(plain.split()) <= lexicon, plain  # the test needs a misspelling to mend
    assert spelled.split() and set(spelled.split()) <= lexicon, spelled
    assert wer([spelled], [said]) < wer([plain], [said]), (plain, spelled)
    assert model.transcribe(path, ctc_weight=1.0, beam_size=16, lexicon=sorted(lexicon)) == spelled  # the Python API
    alone = model.transcribe(path, ctc_weight=0.0, lexicon=sorted(lexicon))  # the decoder alone, in a beam with it
    assert alone.split() and set(alone.split()) <= lexicon, alone
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        run_transcribe([path], None, lexicon=str(tmp_path / "nowhere.txt"))


def test_long_recording_is_transcribed_by_its_speech_runs(model, tmp_path):
    """40 s (over the 30 s a prompt takes): the question four times, 10 s of silence apart. Each run is its own
    segment, at the clip's place, whose text holds the clip's own transcript (the 0.2 s of silence a window keeps
    before its run can make this small model hear "at the top" first) and is the text of its window transcribed
    alone; its words are that window's, moved by the window's offset."""
    wave, rate = sf.read(str(example("question.wav")), dtype="float32")
    silence = np.zeros(10 * rate, np.float32)
    starts = [1.0 + k * (len(wave) / rate + 10) for k in range(4)]
    sf.write(str(tmp_path / "long.wav"), np.concatenate([silence[:rate]] + [np.concatenate([wave, silence])] * 4), rate)
    alone = model.transcript(str(example("question.wav")))
    long = model.transcript(str(tmp_path / "long.wav"))
    assert long.duration > model.config.max_audio_seconds and len(long.segments) == 4
    assert long.text == " ".join(sg.text for sg in long.segments)
    recording = np.concatenate([silence[:rate]] + [np.concatenate([wave, silence])] * 4)
    for segment, start in zip(long.segments, starts):
        assert alone.text in segment.text and start - 0.25 <= segment.start <= start
        window = recording[round(segment.start * rate):round(segment.end * rate)]
        own = model.transcript((window, rate))
        assert segment.text == own.text
        own = own.words
        assert [(w.text, w.start, w.end) for w in segment.words] == [
            (w.text, round(w.start + segment.start, 3), round(w.end + segment.start, 3)) for w in own]
    done = mm_cli("transcribe", str(tmp_path / "long.wav"))
    assert done.returncode == 0 and done.stdout.count(alone.text) == 4, done.stderr


def test_console_commands_on_the_bundled_examples(tmp_path):
    done = mm_cli("caption")
    assert done.returncode == 0, done.stderr
    assert is_caption(done.stdout.strip())
    done = mm_cli("transcribe", "--timestamps", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert wer([doc[0]["text"]], [TRUTH["question.wav"]["text"]]) <= 20
    assert doc[0]["segments"][0]["words"]
    done = mm_cli("eval", "--n", "16", "--json", str(tmp_path / "eval.json"))
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["split"] == "heldout" and figures["transcribe"]["wer"] < 10 and figures["caption"]["rouge_l"] > 40
    # it reads the images (and hears the spoken questions): answering from the language prior gets about a third right
    assert figures["question"]["accuracy"] > 50 and figures["spoken"]["accuracy"] > 40


def test_bad_input_through_the_command_line_and_api(model, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("this is text, not a picture")
    done = mm_cli("caption", str(fake))
    assert done.returncode == 2 and "photo.png" in done.stderr and "Traceback" not in done.stderr
    done = mm_cli("transcribe", str(fake))
    assert done.returncode == 2 and "photo.png" in done.stderr and "Traceback" not in done.stderr
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16000 * 40, np.float32), 16000)
    done = mm_cli("transcribe", str(long))  # 40 s of silence: no speech run, so no text (nothing made up)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stderr
    with pytest.raises(InputError, match="long.wav: 40.0 s is longer than the limit of 30 s"):
        model.chat([{"role": "user", "content": [{"type": "audio", "audio": str(long)}]}])
    done = mm_cli("caption", str(tmp_path / "missing.png"))
    assert done.returncode == 2 and "missing.png" in done.stderr
    with pytest.raises(InputError, match="photo.png"):
        model.caption(str(fake))
    with pytest.raises(InputError, match="placeholder"):
        model.chat([{"role": "user", "content": "<image>"}], images=[str(example("scene.png"))] * 2)
    with pytest.raises(InputError, match="messages is empty"):
        model.chat([])


def test_demos_run_on_the_shipped_model():
    done = subprocess.run([sys.executable, str(ROOT / "demos" / "caption.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert is_caption(done.stdout.split(": ", 1)[1].strip())
    done = subprocess.run([sys.executable, str(ROOT / "demos" / "transcribe.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    first, *words = done.stdout.strip().splitlines()
    assert wer([first.split(": ", 1)[1]], [TRUTH["question.wav"]["text"]]) <= 20 and words


def test_eval_refuses_an_unknown_split(model):
    from mm.eval.evaluate import evaluate

    with pytest.raises(ValueError, match="split must be 'heldout' or 'novel-pairs'"):
        evaluate(model, n=1, split="train")
    done = mm_cli("eval", "--split", "train")
    assert done.returncode == 2 and "invalid choice: 'train'" in done.stderr


def test_eval_question_accuracy_by_objects_in_the_scene(model):
    from mm.eval.evaluate import EVAL_SEED, evaluate, format_results
    from mm.data.scenes import scene_examples

    r = evaluate(model, n=24, tasks=("question",))
    counts = Counter(len(s.scene) for s in scene_examples(24, "heldout", seed=EVAL_SEED, size=48))
    by_objects = r["question"]["by_objects"]
    assert sorted(by_objects) == sorted(str(c) for c in counts)
    # the groups partition the items: their accuracies, weighted by group size, give the overall accuracy
    assert sum(by_objects[str(c)] * k for c, k in counts.items()) / 24 == pytest.approx(r["question"]["accuracy"])
    assert "by objects in the scene  1: " in format_results(r)
    forms = r["question"]["by_form"]  # the forms partition the items of 2 and 3 objects
    assert sum(v["n"] for v in forms.values()) == counts[2] + counts[3]
    assert sum(v["accuracy"] * v["n"] for v in forms.values()) == pytest.approx(
        by_objects["2"] * counts[2] + by_objects["3"] * counts[3])


def test_shipped_model_is_small():
    size = sum(f.stat().st_size for f in default_multimodal_dir().iterdir())
    assert size < 40 * 2**20


def test_eval_quantizes_the_decoder_and_projector_in_memory(tmp_path):
    """`mm eval --quantize int8|int4|w8a8|w4a8`: every linear of the decoder and projector becomes a quantized one, the encoders
    keep theirs, and the logits move by rounding only."""
    from torch import nn

    from decoders.qlinear import QuantLinear
    from mm.eval.evaluate import quantize_in_memory

    plain = mm.load()
    inputs = plain.processor()([{"role": "user", "content": "<image>\ndescribe the image."}], [example("scene.png")])
    want = plain(**inputs).logits
    for kind, tolerance in (("int8", 0.02), ("int4", 0.2), ("w8a8", 0.05), ("w4a8", 0.2)):
        q = quantize_in_memory(mm.load(), kind)
        for part, before in ((q.language_model, plain.language_model), (q.projector, plain.projector)):
            linears = sum(isinstance(m, nn.Linear) for m in before.modules())
            assert linears and sum(isinstance(m, QuantLinear) for m in part.modules()) == linears
            assert not any(isinstance(m, nn.Linear) for m in part.modules())
        assert any(isinstance(m, nn.Linear) for m in q.speech_encoder.modules())
        err = float((q(**inputs).logits - want).abs().max() / want.abs().max())
        assert 0 < err < tolerance, (kind, err)
    done = mm_cli("eval", "--n", "4", "--tasks", "question", "--quantize", "int4", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "shipped (int4)"


def test_mm_transcribe_reads_headerless_pcm_at_the_rate_it_is_given(tmp_path):
    """`mm transcribe x.raw --sample-rate R`: 16-bit little-endian PCM read at R gives the WAV's transcript; a file
    whose header says another rate is refused, naming both."""
    samples, rate = sf.read(example("question.wav"), dtype="int16")
    raw = tmp_path / "question.raw"
    raw.write_bytes(samples.astype("<i2").tobytes())
    want = mm_cli("transcribe", str(example("question.wav")), "--timestamps")
    got = mm_cli("transcribe", str(raw), "--sample-rate", str(rate), "--timestamps")
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and wer([got.stdout.split("] ", 1)[1]], [TRUTH["question.wav"]["text"]]) <= 20
    bad = mm_cli("transcribe", str(example("question.wav")), "--sample-rate", "8000")
    assert bad.returncode == 2 and f"the file says {rate} Hz but sample_rate=8000 was given" in bad.stderr
    long = mm_cli("transcribe", str(raw), "--sample-rate", str(rate), "--max-minutes", "0.01")  # no header: read
    assert long.returncode == 2 and f"{raw}: 2.2 s is longer than the limit of 0.6 s" in long.stderr
