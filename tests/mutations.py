"""Mutation check: plant single-line bugs, one at a time, in a copy of the working tree and run the tests that
should catch each. Not collected by pytest; run `python tests/mutations.py` (a few minutes). Exits 1 when a planted
bug passes its tests, or when a mutation no longer applies (the line it changes is gone: update the list)."""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ["decoders", "encoders", "mm", "tests", "demos", "pyproject.toml"]

# (what the bug is, file, line as it is, line with the bug, tests to run)
MUTATIONS = [
    ("temperature ignored in sampling", "decoders/generate.py",
     "logits = logits.float() / temperature", "logits = logits.float()", ["tests/decoders/test_sampling.py"]),
    ("top-p drops the token that crosses p", "decoders/generate.py",
     "drop_sorted = probs.cumsum(dim=-1) - probs >= top_p", "drop_sorted = probs.cumsum(dim=-1) >= top_p",
     ["tests/decoders/test_sampling.py"]),
    ("the recipe never steps the optimizer", "mm/train/recipe_tiny.py",
     "            opt.step()\n", "            pass\n",
     ["tests/mm/test_multimodal.py::test_resumed_run_equals_uninterrupted_run"]),
    ("word times halved (shared aligner)", "mm/models/transcript.py",
     "start, end = g[0][1].start * frame_shift + offset, g[-1][1].end * frame_shift + offset",
     "start, end = g[0][1].start * frame_shift / 2 + offset, g[-1][1].end * frame_shift / 2 + offset",
     ["tests/mm/test_transcribe.py::test_word_times_are_encoder_frames_of_40_ms",
      "tests/mm/test_shipped.py::test_word_times_move_with_the_audio"]),
    ("word times halved (encoder frame shift)", "encoders/speech_encoder.py",
     "return self.frontend.hop_length / self.frontend.sample_rate * SUBSAMPLING",
     "return self.frontend.hop_length / self.frontend.sample_rate * SUBSAMPLING / 2",
     ["tests/mm/test_transcribe.py::test_word_times_are_encoder_frames_of_40_ms",
      "tests/mm/test_shipped.py::test_word_times_move_with_the_audio"]),
    ("Llama 3 RoPE smoothing weights swapped", "decoders/llama.py",
     "blended = (1 - smooth) * scaled / factor + smooth * scaled",
     "blended = smooth * scaled / factor + (1 - smooth) * scaled", ["tests/decoders/test_llama.py"]),
    ("rms_norm_eps ignored", "decoders/llama.py",
     "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
     "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)", ["tests/decoders/test_llama.py"]),
]


def pytest_in_copy(tests, path=None, before=None, after=None) -> int:
    """pytest's exit code on `tests` in a copy of the tree (with `before` replaced by `after` in `path`);
    -1 when `before` is not in the file exactly once."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in COPY:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / name)
        if path is not None:
            f = Path(tmp) / path
            text = f.read_text()
            if text.count(before) != 1:
                return -1
            f.write_text(text.replace(before, after))
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp,
                              capture_output=True, text=True)
        return done.returncode


def run(bug, path, before, after, tests) -> str:
    """'caught' (the tests fail: pytest exits 1), 'MISSED', or 'STALE' (the line to change is gone)."""
    rc = pytest_in_copy(tests, path, before, after)
    return "STALE" if rc == -1 else "caught" if rc == 1 else "MISSED"


def main() -> int:
    tests = sorted({t for *_, ts in MUTATIONS for t in ts})
    if pytest_in_copy(tests) != 0:  # a planted bug only counts as caught when the same tests pass without it
        print("the tests fail without any planted bug; fix them first")
        return 1
    bad = 0
    for bug, path, before, after, tests in MUTATIONS:
        verdict = run(bug, path, before, after, tests)
        bad += verdict != "caught"
        print(f"{verdict:7} {bug} ({path})", flush=True)
    print(f"{len(MUTATIONS) - bad} of {len(MUTATIONS)} planted bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
