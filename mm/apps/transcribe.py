"""`mm transcribe AUDIO... [--model DIR] [--decode ctc|attention|joint|rescore] [--beam N] [--timestamps]
[--format text|json|srt] [--max-minutes M] [--lexicon WORDS.txt]`: batch transcription of files with an ASR model
(our format or an ESPnet/Dolphin experiment directory).

Output formats (to stdout, or one file per input with `out_dir`):
  text  one line per file (prefixed by "PATH: " when there are several); with --timestamps one line per segment,
        "[HH:MM:SS.mmm --> HH:MM:SS.mmm] text".
  json  one JSON document: a list with, per file, file, text, language, region, duration, tokens and segments
        (start, end, text, words with start/end/score when --timestamps).
  srt   SubRip cues, one per segment (segments are VAD windows, trimmed to their first and last word; --timestamps
        is implied). Several files without out_dir: their SRT blocks follow one another, numbering restarts.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from decoders.lexicon import LEXICON_WEIGHT, Lexicon
from encoders.audio import MAX_MINUTES, too_long

from mm.apps.options import set_threads
from mm.models.asr import ASRModel
from mm.models.asr_search import DECODE_MODES
from mm.models.fusion_speech import check_decode
from mm.models.transcript import Transcript
from mm.models.formats import TRANSCRIBERS, load

FORMATS = ("text", "json", "srt")
SUFFIX = {"text": ".txt", "json": ".json", "srt": ".srt"}


def timecode(seconds: float, sep: str = ",") -> str:
    """Seconds -> HH:MM:SS,mmm (SRT; sep="." for the text format)."""
    ms = int(round(max(0.0, seconds) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(result: Transcript) -> str:
    """SubRip cues of the non-empty segments, numbered from 1."""
    cues = []
    for seg in result.segments:
        if seg.text.strip():
            end = max(seg.end, seg.start + 0.001)  # a cue needs a positive duration
            cues.append(f"{len(cues) + 1}\n{timecode(seg.start)} --> {timecode(end)}\n{seg.text.strip()}\n")
    return "\n".join(cues)


def to_json_obj(result: Transcript, timestamps: bool) -> dict:
    """The JSON object of one file."""
    segments = []
    for seg in result.segments:
        s = {"start": seg.start, "end": seg.end, "text": seg.text.strip(), "language": seg.language,
             "region": seg.region}
        if timestamps:
            s["words"] = [{"text": w.text, "start": w.start, "end": w.end, "score": round(w.score, 4)}
                          for w in seg.words]
        segments.append(s)
    return {"file": result.source, "text": result.text, "language": result.language, "region": result.region,
            "duration": result.duration, "tokens": result.tokens, "segments": segments}


def to_text(result: Transcript, timestamps: bool) -> str:
    """Plain text: the transcript, or one "[start --> end] text" line per segment with timestamps."""
    if not timestamps:
        return result.text.strip() + "\n"
    return "".join(f"[{timecode(s.start, '.')} --> {timecode(s.end, '.')}] {s.text.strip()}\n"
                   for s in result.segments if s.text.strip())


def render(results: list[Transcript], fmt: str, timestamps: bool) -> str:
    """All results in one output document of format fmt."""
    if fmt == "json":
        return json.dumps([to_json_obj(r, timestamps) for r in results], indent=2, ensure_ascii=False) + "\n"
    if fmt == "srt":
        return "\n".join(to_srt(r) for r in results)
    return "".join(to_text(r, timestamps) for r in results)  # several files to stdout: TextStream, with their names


class TextStream:
    """The text format written as segments are decoded (flushed each time) instead of after the last file: a line
    per segment with timestamps, else each file's line growing window by window. With every file in input order and
    each finished once, the bytes equal `render`'s; a file that fails before its first segment writes nothing."""

    def __init__(self, out, prefix: bool, timestamps: bool, joiner: str = " "):
        self.out, self.prefix, self.timestamps, self.joiner = out, prefix, timestamps, joiner
        self.open, self.started, self.finished = None, False, set()  # file index being written, its text begun

    def segment(self, index: int, source: str, seg) -> None:
        text = seg.text.strip()
        if index in self.finished or not text:  # a file decoded again after another file's failure: written already
            return
        self._begin(index, source)
        if self.timestamps:
            self.out.write(f"[{timecode(seg.start, '.')} --> {timecode(seg.end, '.')}] {text}\n")
        else:
            self.out.write((self.joiner if self.started else "") + text)
        self.started = True
        self.out.flush()

    def finish(self, index: int, source: str) -> None:
        """The file is done: its line ends (an empty one if nothing was heard)."""
        if index not in self.finished:
            self._begin(index, source)
            self.out.write("" if self.timestamps else "\n")
            self.out.flush()
            self.finished.add(index)
            self.open = None

    def _begin(self, index: int, source: str) -> None:
        if self.open != index:
            if self.open is not None:
                self.finish(self.open, "")
            self.open, self.started = index, False
            if self.prefix:
                self.out.write(f"{source}:" + ("\n" if self.timestamps else " "))


def check_out_names(files: list[str], fmt: str) -> None:
    """ValueError when two inputs would write one output file (out_dir/<stem><suffix>)."""
    seen: dict[str, str] = {}
    for f in files:
        name = Path(f).stem + SUFFIX[fmt]
        if name in seen:
            raise ValueError(f"--out-dir: {seen[name]} and {f} would both write {name}; rename one, or write to stdout")
        seen[name] = str(f)


def write_files(files: list[str], results: list[Transcript], fmt: str, timestamps: bool, out_dir: Path) -> None:
    """Write each transcript to out_dir/<stem><suffix> in fmt (json: one object per file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, r in zip(files, results):
        if fmt == "json":
            text = json.dumps(to_json_obj(r, timestamps), indent=2, ensure_ascii=False) + "\n"
        else:
            text = render([r], fmt, timestamps)
        (out_dir / (Path(f).stem + SUFFIX[fmt])).write_text(text, encoding="utf-8")


def check_options(files: list[str], fmt: str, beam: int | None, batch_size: int, max_minutes: float | None,
                  out_dir: str | None, sample_rate: int | None = None) -> None:
    """ValueError naming the first option that `run_transcribe` cannot take."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not files:
        raise ValueError("no audio files given")
    if out_dir is not None:
        check_out_names(files, fmt)
    if beam is not None and beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {max_minutes}")
    if sample_rate is not None and sample_rate <= 0:
        raise ValueError(f"--sample-rate must be > 0, got {sample_rate}")


def decode_files(model, files: list[str], which: list[int], stream: TextStream | None, timestamps: bool,
                 progress: bool | None, decode: str | None, beam: int | None, sample_rate: int | None,
                 max_minutes: float | None, lexicon: Lexicon | None = None, lexicon_weight: float = LEXICON_WEIGHT,
                 **dolphin) -> list[Transcript]:
    """Transcripts of `files[i] for i in which`, each segment handed to `stream` as it is decoded (if any).
    `sample_rate`: the files' rate (headerless PCM needs it). lexicon / lexicon_weight: a word list for the beam
    search and its weight. `dolphin`: batch_size, language and region for an ESPnet/Dolphin model."""
    paths = [files[i] for i in which]

    def show(k, segment):  # paths[k]'s segment, to the stream
        stream.segment(which[k], paths[k], segment)

    if isinstance(model, ASRModel):  # windows of all files decoded together in batches
        out = model.transcribe(paths, decode=decode, beam=beam or 10, timestamps=timestamps, progress=progress,
                               sample_rate=sample_rate, max_minutes=max_minutes, on_segment=show if stream else None,
                               lexicon=lexicon, lexicon_weight=lexicon_weight, **dolphin)
        for i in which if stream else []:
            stream.finish(i, files[i])
        return out
    out = []
    for k, f in enumerate(paths):
        out.append(model.transcript(f if sample_rate is None else (f, sample_rate), source=f, decode=decode, beam=beam,
                                    max_minutes=max_minutes, lexicon=lexicon, lexicon_weight=lexicon_weight,
                                    progress=sys.stderr.isatty() if progress is None else progress,
                                    on_segment=functools.partial(show, k) if stream else None))
        if not timestamps:
            for segment in out[-1].segments:
                segment.words = []
        if stream:
            stream.finish(which[k], f)
    return out


def run_transcribe(files: list[str], model_dir: str | None, decode: str | None = None, beam: int | None = None,
                   timestamps: bool = False, fmt: str = "text", batch_size: int = 8, out=None,
                   out_dir: str | None = None, progress: bool | None = None, device: str = "cpu",
                   language: str | None = None, region: str | None = None,
                   max_minutes: float | None = MAX_MINUTES, sample_rate: int | None = None,
                   lexicon: str | None = None, lexicon_weight: float = LEXICON_WEIGHT) -> list[Transcript]:
    """Transcribe files in batches and write them in fmt to `out` (default stdout) or to out_dir/<name><suffix>.
    A file that cannot be decoded does not stop the others: they are written, then a ValueError names each failure.

    decode / beam: the search (see --decode) and its width (None: 10 for ESPnet/Dolphin models, 4 for the multimodal).
    progress: a tqdm bar over the decoded windows on stderr (None: only when stderr is a terminal).
    language / region: Dolphin prompt symbols such as "en" / "US" (default: detected per window); a region needs
    its language.
    max_minutes: a longer recording (by its header, before it is decoded) fails, naming its length; None: no limit.
    sample_rate: the rate of every file: headerless .raw/.pcm (16-bit signed little-endian mono) need it; a file whose
    header says another rate fails.
    lexicon: a word-list file (one word per line, optionally with a count): the beam search then spells only its words
    (`decoders.lexicon`), their unigram score weighted by lexicon_weight ("ctc" becomes a beam search).
    """
    check_options(files, fmt, beam, batch_size, max_minutes, out_dir, sample_rate)
    timestamps = timestamps or fmt == "srt"  # srt cues are trimmed to the words
    model = load(model_dir, expect=TRANSCRIBERS, device=device)
    if not isinstance(model, ASRModel):  # option errors, before any file is decoded
        check_decode(decode, option=f"--decode {decode}")
        if language or region:
            raise ValueError("--language / --region choose a Dolphin-style model's prompt; the multimodal model has none")
    if lexicon is not None:
        lexicon = Lexicon.from_file(lexicon)  # a bad file fails before anything is decoded
    checked = [(f, too_long(f, max_minutes, "--max-minutes")) for f in map(str, files)]  # before anything is decoded
    files = [f for f, why in checked if why is None]
    failed: dict[str, str] = {f: why for f, why in checked if why is not None}
    stream = None
    if fmt == "text" and out_dir is None:  # segments written as they are decoded
        joiner = "" if isinstance(model, ASRModel) and model.config.token_type == "char" else " "
        stream = TextStream(out or sys.stdout, len(checked) > 1, timestamps, joiner)
    run = functools.partial(decode_files, model, files, stream=stream, timestamps=timestamps, progress=progress,
                            decode=decode, beam=beam, sample_rate=sample_rate, batch_size=batch_size,
                            language=language, region=region, max_minutes=max_minutes,
                            lexicon=lexicon, lexicon_weight=lexicon_weight)
    try:
        results = run(list(range(len(files)))) if files else []
    except ValueError:  # one bad file must not cost the others: decode them one by one, naming each failure
        results = []
        for i, f in enumerate(files):
            try:
                results += run([i])
            except ValueError as e:
                why = str(e).removeprefix("audio 0: ")
                failed[f] = why if f in why else f"{f}: {why}"
        files = [f for f in files if f not in failed]
    if out_dir is not None:
        write_files(files, results, fmt, timestamps, Path(out_dir))
    elif stream is None:
        (out or sys.stdout).write(render(results, fmt, timestamps))
    if failed:
        raise ValueError(f"{len(failed)} of {len(failed) + len(files)} files failed (the others were written): "
                         + "; ".join(failed.values()))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mm transcribe` (for the lead's mm/cli.py)."""
    p.add_argument("audio", nargs="*", help="audio files (wav, flac, ogg, mp3, ...; default: the bundled example)")
    p.add_argument("--model", help="our multimodal or ASR directory, or an ESPnet/Dolphin experiment "
                   "(default: the shipped multimodal model)")
    p.add_argument("--decode", choices=DECODE_MODES, default=None,
                   help="ctc, attention, joint (default when the model has a decoder) or rescore (ESPnet/Dolphin only)")
    p.add_argument("--beam", type=int, default=None, help="beam width (default: 10; 4 for the multimodal model)")
    p.add_argument("--timestamps", action="store_true", help="word and segment times from CTC alignment")
    p.add_argument("--format", choices=FORMATS, default="text", dest="fmt")
    p.add_argument("--batch-size", type=int, default=8, help="windows decoded together")
    p.add_argument("--out-dir", default=None, help="write one output file per input here instead of stdout")
    p.add_argument("--language", default=None, help="Dolphin-style models: language symbol, e.g. en (default: detect)")
    p.add_argument("--region", default=None,
                   help="Dolphin-style models: region symbol, e.g. US or SICHUAN; needs --language (default: detect)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: torch's choice; 1 is often fastest for small models on busy machines)")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="the inputs' sample rate: needed for headerless .raw/.pcm (16-bit signed little-endian mono)")
    p.add_argument("--lexicon", default=None, metavar="WORDS.txt",
                   help="spell only the words of this list (one per line, optionally 'word count'), e.g. "
                        "/usr/share/dict/words: it must hold the words said; --decode ctc then searches a beam (the "
                        "multimodal model: best with --decode ctc --beam 16)")
    p.add_argument("--lexicon-weight", type=float, default=LEXICON_WEIGHT,
                   help=f"the word list's unigram weight in the search (default {LEXICON_WEIGHT:g})")
    p.add_argument("--max-minutes", type=float, default=MAX_MINUTES,
                   help=f"refuse longer recordings, from their header before decoding (default {MAX_MINUTES:g})")


def cmd_transcribe(args) -> int:
    """Entry point of `mm transcribe` for a parsed namespace from add_arguments."""
    set_threads(args.threads)
    if not args.audio:
        from mm.assets import example

        args.audio = [str(example("question.wav"))]
        print(f"(no audio given: transcribing the bundled example {args.audio[0]})", file=sys.stderr)
    run_transcribe(args.audio, args.model, decode=args.decode, beam=args.beam, timestamps=args.timestamps,
                   fmt=args.fmt, batch_size=args.batch_size, out_dir=args.out_dir, device=args.device,
                   language=args.language, region=args.region, max_minutes=args.max_minutes,
                   sample_rate=args.sample_rate, lexicon=args.lexicon, lexicon_weight=args.lexicon_weight)
    return 0
