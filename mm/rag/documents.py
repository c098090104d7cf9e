"""Loading files into cited chunks: text, Markdown, HTML, PDF, images (by caption), audio (by timed transcript).

Chunking counts tokens as words and punctuation marks (`TOKEN`: model-independent, close to what BM25 and a
sentence-transformers tokenizer see). A chunk is whole paragraphs up to `max_tokens`; a paragraph longer than
`max_tokens - overlap` is cut at sentence ends (a sentence longer still, by tokens). Each chunk after the first starts with
the previous chunk's last paragraphs that fit in `overlap` tokens (or, when its last paragraph is longer, that
paragraph's last `overlap` tokens), so a passage split across two chunks is whole in one of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

TOKEN = re.compile(r"\w+|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TEXT_SUFFIXES = {".txt", ".text", ".rst", ".log", ".csv", ".tsv", ".json", ".yaml", ".yml", ".py", ".toml", ".cfg",
                 ".ini", ""}
KINDS = {**{s: "text" for s in TEXT_SUFFIXES}, ".md": "markdown", ".markdown": "markdown", ".html": "html",
         ".htm": "html", ".pdf": "pdf", ".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image",
         ".bmp": "image", ".gif": "image", ".wav": "audio", ".flac": "audio", ".mp3": "audio", ".ogg": "audio",
         ".m4a": "audio"}


@dataclass
class Chunk:
    """A piece of a file as indexed: its text, the file and where in it (`lines 3-9`, `p. 2`, `00:12-00:40`)."""

    source: str
    location: str
    text: str
    kind: str


@dataclass
class Unit:
    """A paragraph (or a piece of one) and where it is: first/last line, page, or start/end seconds."""

    text: str
    start: float
    end: float


def kind_of(path: str | Path) -> str | None:
    """The loader a file goes to by its suffix (None: not a kind we index)."""
    return KINDS.get(Path(path).suffix.lower())


def count_tokens(text: str) -> int:
    """Words and punctuation marks in `text`."""
    return sum(1 for _ in TOKEN.finditer(text))


def tail_tokens(text: str, n: int) -> str:
    """The last `n` tokens of `text` with the original spacing."""
    spans = [m.start() for m in TOKEN.finditer(text)]
    return text[spans[-n]:] if 0 < n < len(spans) else text if n > 0 else ""


def cut_long(text: str, max_tokens: int) -> list[str]:
    """`text` as pieces of at most `max_tokens` tokens: sentences packed together, long sentences cut by tokens."""
    if count_tokens(text) <= max_tokens:
        return [text]
    pieces, current = [], ""
    for sentence in SENTENCE_END.split(text):
        starts = [m.start() for m in TOKEN.finditer(sentence)]
        parts = [sentence[starts[i]:starts[i + max_tokens] if i + max_tokens < len(starts) else None].strip()
                 for i in range(0, len(starts), max_tokens)] or [sentence]
        for part in parts:
            joined = f"{current} {part}".strip()
            if current and count_tokens(joined) > max_tokens:
                pieces.append(current)
                joined = part
            current = joined
    return pieces + ([current] if current else [])


def pack(units: list[Unit], max_tokens: int = 200, overlap: int = 40) -> list[tuple[str, float, float]]:
    """Chunks (text, start, end) of whole units up to `max_tokens` tokens, each starting with up to `overlap` tokens
    of the previous chunk's end (see the module docstring)."""
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"chunking needs max_tokens >= 1 and 0 <= overlap < max_tokens, got {max_tokens}, {overlap}")
    pieces = [Unit(p, u.start, u.end) for u in units for p in cut_long(u.text.strip(), max_tokens - overlap) if p.strip()]
    chunks, current = [], []  # current: [(text, start, end, tokens, carried)]
    for u in pieces:
        n = count_tokens(u.text)
        if current and any(not c[4] for c in current) and sum(c[3] for c in current) + n > max_tokens:
            chunks.append(current)
            current, used = [], 0
            for c in reversed(chunks[-1]):  # the overlap: last whole units that fit, else the last one's tail
                if used + c[3] > overlap:
                    if not current and overlap and max_tokens - n >= 1:
                        tail = tail_tokens(c[0], min(overlap, max_tokens - n))
                        current = [(tail, c[2], c[2], count_tokens(tail), True)]
                    break
                current.insert(0, (c[0], c[1], c[2], c[3], True))
                used += c[3]
            while current and sum(c[3] for c in current) + n > max_tokens:
                current.pop(0)
        current.append((u.text, u.start, u.end, n, False))
    if current and any(not c[4] for c in current):
        chunks.append(current)
    return [("\n\n".join(c[0] for c in chunk), chunk[0][1], chunk[-1][2]) for chunk in chunks]


def paragraphs(text: str) -> list[Unit]:
    """Blank-line separated paragraphs of `text` with their first and last line numbers (from 1)."""
    units, lines, start = [], [], 0
    for i, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            start = start or i
            lines.append(line.strip())
        elif lines:
            units.append(Unit(" ".join(lines), start, i - 1))
            lines, start = [], 0
    return units


class _HTMLText(HTMLParser):
    """Text of an HTML page as paragraphs, each with the heading it falls under; scripts and styles dropped."""

    BLOCKS = {"p", "div", "li", "ul", "ol", "tr", "table", "pre", "section", "article", "blockquote", "br", "hr",
              "h1", "h2", "h3", "h4", "h5", "h6", "header", "footer", "dd", "dt", "title", "td", "th"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self.words, self.heading, self.skip, self.in_heading = [], [], "", 0, False

    def flush(self):
        text = " ".join("".join(self.words).split())
        if text:
            if self.in_heading:
                self.heading = text
            self.paragraphs.append((text, self.heading))
        self.words = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "template"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.flush()
            self.in_heading = tag in ("h1", "h2", "h3", "h4", "h5", "h6")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "template"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.flush()
            self.in_heading = False

    def handle_data(self, data):
        if not self.skip:
            self.words.append(data)


def html_sections(html: str) -> list[tuple[str, str]]:
    """(paragraph, heading) pairs of an HTML page in reading order."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    parser.flush()
    return parser.paragraphs


def mmss(seconds: float) -> str:
    """03:12 for 192 seconds (h:mm:ss past an hour)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def load(path: str | Path, model=None, max_tokens: int = 200, overlap: int = 40) -> list[Chunk]:
    """The chunks of one file. Images are captioned and audio transcribed by `model` (needed for those only)."""
    path = Path(path)
    kind, source = kind_of(path), str(path)
    if kind is None:
        raise ValueError(f"{path}: cannot index files of type {path.suffix!r} (known: {', '.join(sorted(k for k in KINDS if k))})")
    if kind in ("image", "audio") and model is None:
        raise ValueError(f"{path}: indexing {kind} needs a model to {'caption' if kind == 'image' else 'transcribe'} it")
    if kind in ("text", "markdown"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return [Chunk(source, f"lines {a:.0f}-{b:.0f}" if a != b else f"line {a:.0f}", t, kind)
                for t, a, b in pack(paragraphs(text), max_tokens, overlap)]
    if kind == "html":
        sections = html_sections(path.read_text(encoding="utf-8", errors="replace"))
        headings = [h for _, h in sections]
        chunks = pack([Unit(t, i, i) for i, (t, _) in enumerate(sections)], max_tokens, overlap)
        return [Chunk(source, f"§ {headings[int(b)]}" if headings[int(b)] else f"part {n + 1}", t, kind)
                for n, (t, a, b) in enumerate(chunks)]
    if kind == "pdf":
        return load_pdf(path, max_tokens, overlap)
    if kind == "image":
        return [Chunk(source, "image", model.caption(str(path)).strip(), kind)]
    transcript = model.transcript(str(path))
    units = [Unit(s.text, s.start, s.end) for s in transcript.segments if s.text.strip()]
    return [Chunk(source, f"{mmss(a)}-{mmss(b)}", t, kind) for t, a, b in pack(units, max_tokens, overlap)]


def load_pdf(path: Path, max_tokens: int, overlap: int) -> list[Chunk]:
    """A PDF's chunks (pypdf's text extraction), cited by page: `p. N`, `pp. N-M`."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise ValueError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from None
    try:
        # layout mode keeps the vertical gaps between paragraphs as empty lines (the plain mode drops them)
        pages = [page.extract_text(extraction_mode="layout") or "" for page in PdfReader(path).pages]
    except PdfReadError as e:
        raise ValueError(f"{path}: not a readable PDF ({e})") from None
    units = [Unit(" ".join(p.text.split()), n, n) for n, page in enumerate(pages, start=1) for p in paragraphs(page)]
    return [Chunk(str(path), f"p. {a:.0f}" if a == b else f"pp. {a:.0f}-{b:.0f}", t, "pdf")
            for t, a, b in pack(units, max_tokens, overlap)]
