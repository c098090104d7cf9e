"""What transcription returns: words with times, segments (the windows a recording was decoded in), the transcript;
and the one way words are grouped and timed from a CTC forced alignment. Shared by the ASR and the multimodal models."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from decoders.ctc import TokenSpan


@dataclass
class Word:
    """A word with its time span in seconds from the start of the recording; score = mean CTC posterior."""

    text: str
    start: float
    end: float
    score: float


def word_groups(ids: list[int], spans: list[TokenSpan], pieces: list[str], token_type: str = "bpe",
                skip=frozenset()) -> list[list[tuple[int, TokenSpan]]]:
    """CTC-aligned tokens grouped into words: a word starts at a BPE piece beginning with '▁', after a char
    `<space>`, or at every word token; ids in `skip` (specials that print nothing) are left out."""
    groups: list[list[tuple[int, TokenSpan]]] = []
    for i, piece, span in zip(ids, pieces, spans):
        if i in skip:
            continue
        if token_type == "char" and piece == "<space>":
            groups.append([])
            continue
        if token_type == "word" or (token_type == "bpe" and piece.startswith("▁")) or not groups:
            groups.append([])
        groups[-1].append((i, span))
    return groups


def timed_words(groups: list[list[tuple[int, TokenSpan]]], to_text, frame_shift: float, offset: float = 0.0) -> list[Word]:
    """One Word per group of CTC-aligned (token id, span) pairs: its text `to_text(ids)`, from the first token's first
    frame to the last token's end frame (seconds: frame x frame_shift + offset), scored by the frame-weighted mean
    of the tokens' posteriors. Groups with no text are dropped."""
    words = []
    for g in groups:
        text = to_text([i for i, _ in g]).strip() if g else ""
        if not text:
            continue
        start, end = g[0][1].start * frame_shift + offset, g[-1][1].end * frame_shift + offset
        score = sum(s.score * (s.end - s.start) for _, s in g) / sum(s.end - s.start for _, s in g)
        words.append(Word(text, round(start, 3), round(end, 3), score))
    return words


@dataclass
class Segment:
    """One decoded window: text, time span in seconds, words (with timestamps=True), detected language/region."""

    start: float
    end: float
    text: str
    tokens: list[str]
    token_ids: list[int]
    words: list[Word] = field(default_factory=list)
    language: str | None = None
    region: str | None = None


@dataclass
class Transcript:
    """The transcription of one recording: its text, tokens and the segments (windows) it was decoded in."""

    text: str
    tokens: list[str]
    token_ids: list[int]
    segments: list[Segment]
    duration: float
    language: str | None = None
    region: str | None = None
    source: str | None = None

    @classmethod
    def from_segments(cls, segments: list[Segment], duration: float, source: str | None = None,
                      joiner: str = " ") -> "Transcript":
        """The transcript of a recording decoded in these windows (in time order): one window keeps its text exactly,
        several are joined by `joiner` without their edge spaces; the language/region most windows found."""
        langs = Counter((s.language, s.region) for s in segments if s.language is not None).most_common(1)
        text = segments[0].text if len(segments) == 1 else joiner.join(s.text.strip() for s in segments if s.text.strip())
        return cls(text, [t for s in segments for t in s.tokens], [i for s in segments for i in s.token_ids], segments,
                   duration, language=langs[0][0][0] if langs else None, region=langs[0][0][1] if langs else None,
                   source=source)

    @property
    def words(self) -> list[Word]:
        """Words of all segments (empty unless transcribed with timestamps=True)."""
        return [w for s in self.segments for w in s.words]

    def to_dict(self) -> dict:
        """Plain dict for JSON output."""
        return dataclasses.asdict(self)
