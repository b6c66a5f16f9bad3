"""The demo models' corpus: the Python 3.11 documentation's reST sources from Debian's python3.11-doc.

Get the sources (no system-wide install; a Debian/Ubuntu machine with the bookworm archive):

    apt-get update
    cd /tmp && apt-get download python3.11-doc          # python3.11-doc_3.11.2-6+deb12u9_all.deb
    dpkg -x /tmp/python3.11-doc_*_all.deb /tmp/pydoc

The package holds the rendered HTML and, next to it, Sphinx's copy of every reST source page as
plain text under ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt`` (497 pages, ~11 MB). We use
those: plain text, no HTML to strip. License: PSF License Agreement version 2 (the package's
``usr/share/doc/python3.11-doc/copyright``; the docs' own ``license.rst`` adds that code examples
are dual licensed under the Zero-Clause BSD license).

Light cleaning (``clean_rest``) keeps the reST structure (headings, lists, literal blocks, the
``.. function::`` signatures) but drops markup that reads as noise to a small model: label targets,
index/author/toctree-style directives with their bodies, and the ``:role:`` wrappers around
cross-references (``:func:`print``` reads ``print()``, as Sphinx renders it).

A document is one source page. The held-out split takes whole pages in the order of a seeded hash of
their path until it holds ``HELDOUT_FRACTION`` of the characters.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

SOURCES_SUBDIR = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT_FILE = "usr/share/doc/python3.11-doc/copyright"
CHANGELOG_FILE = "usr/share/doc/python3.11-doc/changelog.Debian.gz"
PACKAGE = "python3.11-doc"
HELDOUT_FRACTION = 0.03
DOC_SEPARATOR = "\n\n"  # between pages in heldout.txt

# Directives whose whole block (the directive line and its indented body) is dropped.
_DROPPED_DIRECTIVES = ("index", "module", "moduleauthor", "sectionauthor", "highlight", "testsetup",
                       "testcleanup", "toctree", "include", "literalinclude", "currentmodule",
                       "tabularcolumns", "only", "raw", "contents", "impl-detail", "audit-event-table")
_DIRECTIVE = re.compile(r"^\.\. ([\w:-]+)::")
_LABEL = re.compile(r"^\.\. _[^:]+:\s*$")
# ".. text" without "::" is a reST comment; ".. [1] text" is a footnote (kept).
_COMMENT = re.compile(r"^\.\.(\s+(?!\[)|$)(?!.*::)")
# :role:`text`, :role:`title <target>`, :role:`~a.b.c`, :role:`!name`; roles may be domain-qualified.
_ROLE = re.compile(r":(?P<role>[\w-]+(?::[\w-]+)?):`(?P<body>[^`]+)`")
_CALLABLE_ROLES = {"func", "meth", "c:func", "c:macro"}  # Sphinx renders these with "()"
_HEADING_CHARS = set("=-~^\"*+#'`")


@dataclass(frozen=True)
class Document:
    name: str  # path under _sources, e.g. "library/itertools.rst.txt"
    text: str  # cleaned


def sources_dir(corpus_root: str | Path) -> Path:
    """The _sources directory inside an extracted package root (or that directory itself)."""
    root = Path(corpus_root)
    for candidate in (root / SOURCES_SUBDIR, root):
        if any(candidate.glob("*.rst.txt")):
            return candidate
    raise SystemExit(f"no *.rst.txt sources under {root}; extract python3.11-doc there (see --help)")


def read_documents(corpus_root: str | Path) -> list[Document]:
    """Every source page, cleaned, sorted by path (the order never depends on the file system)."""
    base = sources_dir(corpus_root)
    paths = sorted(base.rglob("*.rst.txt"), key=lambda p: p.relative_to(base).as_posix())
    docs = [Document(p.relative_to(base).as_posix(), clean_rest(p.read_text(encoding="utf-8"))) for p in paths]
    return [d for d in docs if d.text.strip()]


def package_version(corpus_root: str | Path) -> str | None:
    """The Debian version from the package's changelog (first line: ``python3.11 (VERSION) ...``)."""
    import gzip

    changelog = Path(corpus_root) / CHANGELOG_FILE
    if not changelog.is_file():
        return None
    with gzip.open(changelog, "rt", encoding="utf-8") as handle:
        first = handle.readline()
    match = re.match(r"\S+ \(([^)]+)\)", first)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------- cleaning


def clean_rest(text: str) -> str:
    """Drop reST noise (labels, comments, index-like directives) and unwrap cross-reference roles."""
    kept = _drop_blocks(text.splitlines())
    joined = "\n".join(_ROLE.sub(_render_role, line) for line in kept)
    return re.sub(r"\n{3,}", "\n\n", joined).strip() + "\n"


def _drop_blocks(lines: list[str]) -> list[str]:
    kept, dropping_indent = [], None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if dropping_indent is not None:
            if not line.strip() or indent > dropping_indent:
                continue  # still inside the dropped block's body
            dropping_indent = None
        if _starts_dropped_block(line.lstrip()):
            dropping_indent = indent
            continue
        kept.append(line)
    return kept


def _starts_dropped_block(stripped: str) -> bool:
    if _LABEL.match(stripped):
        return True
    directive = _DIRECTIVE.match(stripped)
    if directive:
        return directive.group(1) in _DROPPED_DIRECTIVES
    return bool(_COMMENT.match(stripped))


def _render_role(match: re.Match) -> str:
    role, body = match.group("role"), match.group("body")
    titled = re.match(r"(?s)(.*?)\s*<[^<>]+>$", body)
    if titled and titled.group(1):
        return titled.group(1)  # explicit title: shown as written
    body = body.lstrip("!")
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]  # "~a.b.c" shows only "c"
    if role in ("pep", "rfc"):
        return f"{role.upper()} {body}"  # Sphinx renders :pep:`8` as "PEP 8"
    if role in _CALLABLE_ROLES and not body.endswith(")"):
        body += "()"
    return body


# ----------------------------------------------------------------------------- split


def split_documents(docs: list[Document], *, seed: int = 0,
                    fraction: float = HELDOUT_FRACTION) -> tuple[list[Document], list[Document]]:
    """(train, heldout): whole pages, taken in seeded-hash order until ``fraction`` of the characters."""
    total = sum(len(d.text) for d in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest())
    heldout_names, held = set(), 0
    for doc in order:
        if held >= fraction * total:
            break
        heldout_names.add(doc.name)
        held += len(doc.text)
    train = [d for d in docs if d.name not in heldout_names]
    heldout = [d for d in docs if d.name in heldout_names]
    return train, heldout


def heldout_text(heldout: list[Document]) -> str:
    return DOC_SEPARATOR.join(d.text.strip() for d in heldout) + "\n"


# ----------------------------------------------------------------------------- chat slice

_QUESTION_FORMS = ("Tell me about {}.", "What does the Python documentation say about {}?",
                   "Explain {} briefly.", "{}")


def chat_pairs(doc: Document) -> list[tuple[str, str]]:
    """(question, answer) pairs: a section heading as the question, its first prose paragraph as answer.

    The question form is picked by a hash of the heading, so the set is fixed for a given corpus.
    """
    lines = doc.text.splitlines()
    pairs = []
    for index in range(len(lines) - 1):
        heading = _heading_at(lines, index)
        if heading is None:
            continue
        answer = _first_paragraph(lines, index + 2)
        if answer:
            pairs.append((_question(heading), answer))
    return pairs


def _question(heading: str) -> str:
    if heading.endswith("?"):
        return heading  # FAQ headings are questions already
    digest = int(hashlib.sha256(heading.encode()).hexdigest(), 16)
    return _QUESTION_FORMS[digest % len(_QUESTION_FORMS)].format(heading)


def _heading_at(lines: list[str], index: int) -> str | None:
    title, underline = lines[index].strip(), lines[index + 1].strip()
    if not title or len(underline) < max(3, len(title)) or set(underline) - _HEADING_CHARS:
        return None
    if len(set(underline)) != 1 or set(title) <= _HEADING_CHARS or lines[index] != lines[index].lstrip():
        return None
    title = title.replace("``", "")
    return title if 3 <= len(title) <= 80 else None


def _first_paragraph(lines: list[str], start: int) -> str | None:
    """The first paragraph after ``start`` if it is plain prose (no directive, table, list or code)."""
    index = start
    while index < len(lines) and (not lines[index].strip() or set(lines[index].strip()) <= _HEADING_CHARS):
        index += 1
    paragraph = []
    while index < len(lines) and lines[index].strip():
        paragraph.append(lines[index].strip())
        index += 1
    text = " ".join(paragraph)
    prose = paragraph and paragraph[0][:1].isalpha() and not lines[start:index][-1].startswith(" ")
    if not prose or text.startswith("..") or "|" in text or text.endswith("::") or "::" in paragraph[0]:
        return None
    return text if 60 <= len(text) <= 700 else None


def render_chat(question: str, answer: str) -> str:
    """One exchange through the DeepSeek-R1 chat template (bos, User, Assistant, answer, eos)."""
    import jinja2

    from dsedge.testing.tokenizer import BOS_TOKEN, DEEPSEEK_R1_CHAT_TEMPLATE

    template = jinja2.Environment().from_string(DEEPSEEK_R1_CHAT_TEMPLATE)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return template.render(messages=messages, bos_token=BOS_TOKEN, add_generation_prompt=False)
