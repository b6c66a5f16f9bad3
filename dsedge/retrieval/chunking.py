"""Documents → text → chunks that fit the embedder's token budget, with exact source offsets.

Chunks follow the document's structure: paragraphs (blank-line separated blocks) are packed greedily up to
the budget, a heading (Markdown ``#``, reStructuredText under/overlines, HTML ``<h1>``–``<h6>``) starts a new
chunk, and only a block longer than the budget is split — at line ends, then sentence ends, then spaces, then
word-piece boundaries. Consecutive chunks of one section overlap by up to ``overlap`` tokens (whole words) so
a sentence cut at a boundary is still seen whole by one of them.

Every chunk is ``text[start:end]`` of the document text exactly (offsets are character offsets into the
text as read: the decoded file, or for HTML the extracted text). Token counts come from one tokenizer pass
over the whole document (``token_starts``): a span's count is the number of word pieces starting inside it.
This is exact for BERT-style tokenizers, whose pieces never cross whitespace, and spans are cut only at
whitespace or piece starts.
"""

from __future__ import annotations

import html
import logging
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

from dsedge.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES
# all-MiniLM-L6-v2 truncates at 256 word pieces and was trained on 128-token inputs (model card). 200 leaves
# room for [CLS]/[SEP] with a margin, keeps each chunk whole to the encoder, and is about a paragraph or
# two: small enough to be specific, large enough to carry its context into the LLM prompt.
DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP = 32

_BLANK = re.compile(r"\n[ \t]*\n\s*")
_SEPARATORS = (re.compile(r"\n"), re.compile(r"(?<=[.!?;:])\s+"), re.compile(r"\s+"))
_RST_LINE = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")
_MD_HEADING = re.compile(r"^#{1,6}\s")


@dataclass(frozen=True)
class Chunk:
    """``text == document[start:end]``; ``tokens`` word pieces (no special tokens)."""

    start: int
    end: int
    text: str
    tokens: int


# --- documents ----------------------------------------------------------------------------------------

def collect_documents(paths: Iterable[str | Path]) -> list[Path]:
    """Files with a supported suffix from files and folders (recursively; hidden entries skipped), sorted."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if _is_document(p, path))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UserError(f"unsupported document type {path.suffix or '(no suffix)'!r}", where=str(path),
                                hint=f"pass {', '.join(SUFFIXES)} files or folders holding them")
            found.add(path)
        else:
            raise UserError("document path not found", where=str(path), hint="pass existing files or folders")
    return sorted(p.resolve() for p in found)


def _is_document(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.is_file() and path.suffix.lower() in SUFFIXES


def read_document(path: Path) -> tuple[str, bytes]:
    """(text, raw bytes): UTF-8 (undecodable bytes replaced, with a warning); HTML reduced to its text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("index: %s is not valid UTF-8; undecodable bytes replaced", path)
        text = raw.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return (html_to_text(text) if path.suffix.lower() in HTML_SUFFIXES else text), raw


class _TextExtractor(HTMLParser):
    BLOCKS = {"p", "div", "section", "article", "li", "ul", "ol", "table", "tr", "pre", "blockquote", "br",
              "dt", "dd", "header", "footer", "main", "nav", "aside", "hr", "title", "figure", "figcaption"}
    SKIP = {"script", "style", "head", "noscript", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")  # headings become Markdown headings
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS or re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n")
        self.pre -= tag == "pre" and self.pre > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: blocks separated by blank lines, headings as ``# ...``, <pre> kept."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = re.sub(r"[ \t]*\n[ \t]*(?:\n[ \t]*)+", "\n\n", html.unescape("".join(parser.parts)))
    return text.strip() + "\n"


# --- chunking -----------------------------------------------------------------------------------------

class _Counter:
    """Token counts of spans from one tokenizer pass over the document."""

    def __init__(self, starts: list[int]):
        self.starts = starts

    def __call__(self, a: int, b: int) -> int:
        return bisect_left(self.starts, b) - bisect_left(self.starts, a)

    def index(self, pos: int) -> int:
        return bisect_left(self.starts, pos)


def chunk_text(text: str, token_starts: Callable[[str], list[int]], *, max_tokens: int = DEFAULT_CHUNK_TOKENS,
               overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens; see the module docstring.

    ``token_starts(text)`` returns the character offset where each token starts (no special tokens).
    """
    if max_tokens < 8 or not 0 <= overlap < max_tokens // 2:
        raise UserError(f"chunk budget {max_tokens} / overlap {overlap} is out of range",
                        hint="use --chunk-tokens >= 8 and 0 <= --overlap < half of it")
    count = _Counter(token_starts(text))
    units = [unit for a, b, heading in _blocks(text)
             for unit in _pieces(text, _Unit(a, b, heading), count, max_tokens, token_starts, 0)]
    return [Chunk(u.a, u.b, text[u.a:u.b], _exact(text, u, count, token_starts))
            for u in _pack(text, units, count, max_tokens, overlap)]


class _Unit(NamedTuple):
    a: int
    b: int
    heading: bool = False
    cut: bool = False  # cut inside a word (a token window): its count must be taken on its own text


def _exact(text: str, u: _Unit, count: _Counter, token_starts) -> int:
    return len(token_starts(text[u.a:u.b])) if u.cut else count(u.a, u.b)


def _blocks(text: str) -> list[tuple[int, int, bool]]:
    """Blank-line separated blocks, whitespace trimmed, with whether each is a heading."""
    out, pos = [], 0
    for match in [*_BLANK.finditer(text), None]:
        end = match.start() if match else len(text)
        a, b = _trim(text, pos, end)
        if a < b:
            out.append((a, b, _is_heading(text[a:b])))
        pos = match.end() if match else end
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _is_heading(block: str) -> bool:
    lines = block.split("\n")
    if _MD_HEADING.match(lines[0]):
        return True
    # reST: "Title" + underline, or overline + "Title" + underline; a lone rule line is a transition.
    return len(lines) in (2, 3) and bool(_RST_LINE.match(lines[-1])) and not _RST_LINE.match(lines[-2])


def _pieces(text: str, unit: _Unit, count: _Counter, budget: int, token_starts, level: int) -> list[_Unit]:
    """Units of at most ``budget`` tokens covering ``unit``, split at the coarsest separator that works."""
    if count(unit.a, unit.b) <= budget:
        return [unit]
    if level == len(_SEPARATORS):
        return _token_windows(text, unit, count, budget, token_starts)
    parts, pos = [], unit.a
    for match in [*_SEPARATORS[level].finditer(text, unit.a, unit.b), None]:
        s, e = _trim(text, pos, match.start() if match else unit.b)
        if s < e:
            parts.extend(_pieces(text, _Unit(s, e, unit.heading), count, budget, token_starts, level + 1))
        pos = match.end() if match else unit.b
    return _pack(text, parts, count, budget, 0)


def _token_windows(text: str, unit: _Unit, count: _Counter, budget: int, token_starts) -> list[_Unit]:
    """Last resort for a run without whitespace: cut at word-piece starts. A cut changes how the rest of the
    word tokenizes, so each window is recounted on its own text and shortened until it fits."""
    out, a, last = [], unit.a, count.index(unit.b)
    while a < unit.b:
        i = min(count.index(a) + budget, last)
        while i > count.index(a) + 1 and len(token_starts(text[a:_at(count, i, unit.b)])) > budget:
            i -= 1
        b = _at(count, i, unit.b)
        out.append(_Unit(a, b, unit.heading, cut=True))
        a = b
    return out


def _at(count: _Counter, i: int, end: int) -> int:
    return count.starts[i] if i < len(count.starts) and count.starts[i] < end else end


def _pack(text: str, units: list[_Unit], count: _Counter, budget: int, overlap: int) -> list[_Unit]:
    """Greedily merge consecutive units into units of <= ``budget`` tokens; headings open a new one.

    With ``overlap``, a chunk that follows another in the same section starts with up to ``overlap`` tokens
    (whole words) of the previous one. Units cut inside a word are never merged (their counts are their own).
    """
    out: list[_Unit] = []
    cur: _Unit | None = None
    body = False  # the current unit holds more than headings
    for u in units:
        if cur and not (cur.cut or u.cut) and count(cur.a, u.b) <= budget and not (u.heading and body):
            cur, body = _Unit(cur.a, u.b, cur.heading), body or not u.heading
            continue
        start = u.a
        if cur and overlap and not (u.heading or u.cut or cur.cut):
            start = _overlap_start(text, count, cur, u, overlap, budget)
        if cur:
            out.append(cur)
        cur, body = _Unit(start, u.b, u.heading, u.cut), not u.heading
    return out + [cur] if cur else out


def _overlap_start(text: str, count: _Counter, prev: _Unit, u: _Unit, overlap: int, budget: int) -> int:
    """Start of the last <= ``overlap`` tokens of ``prev``, at a word start, if [that, u.b) fits the budget."""
    first, end = count.index(prev.a), count.index(prev.b)
    for i in range(max(first + 1, end - overlap), end):
        pos = count.starts[i]
        if text[pos - 1].isspace() and count(pos, u.b) <= budget:
            return pos
    return u.a
