"""Retrieval-augmented prompts: search an index, fit numbered sources into the LLM's context budget.

``Retriever`` answers "which chunks" (embedding + HNSW search, timed); ``build_rag_prompt`` answers "what
does the model see": a system instruction, the sources numbered [1], [2], ... in rank order, and the
question — counted in the **LLM's** tokens through the ``count_tokens`` function the caller passes (the
embedder's word pieces say nothing about the generator's vocabulary). Pure functions, no I/O; torch-free.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dsedge.errors import UserError
from dsedge.retrieval.index import Hit, Index

DEFAULT_SYSTEM = ("Answer the question using the numbered sources below. Cite the sources you use by their "
                  "number in square brackets, like [1]. If the sources do not contain the answer, say so.")
ELLIPSIS = " …"
MIN_SOURCE_TOKENS = 24  # a source cut shorter than this carries too little to be worth its header


@dataclass(frozen=True)
class SearchResult:
    """Hits for one question, best first, with the time spent embedding it and searching the graph.

    Behaves as a sequence of ``Hit`` (``len``, iteration, indexing).
    """

    question: str
    hits: list[Hit]
    embed_ms: float
    search_ms: float
    k: int
    ef: int

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]

    @property
    def timings(self) -> dict[str, float]:
        return {"embed_ms": self.embed_ms, "search_ms": self.search_ms}

    def to_json(self) -> dict:
        return {"question": self.question, "k": self.k, "ef": self.ef, "timings": self.timings,
                "hits": [h.to_json() for h in self.hits]}


class Retriever:
    """Query side of an index: ``Retriever.open(path).search(question, k)``."""

    def __init__(self, index: Index):
        self.index = index

    @classmethod
    def open(cls, index_dir: str | Path, *, verify: bool = True, threads: int | None = None) -> Retriever:
        """Open an index directory (``verify``: sha256 of every file; ``threads``: embedder intra-op threads)."""
        return cls(Index.open(index_dir, verify=verify, threads=threads))

    @property
    def ef(self) -> int:
        """Default query-time candidate list size, restored from the index manifest."""
        return self.index.params.ef

    def search(self, question: str, k: int = 5, *, ef: int | None = None) -> SearchResult:
        """The ``k`` chunks most similar to ``question`` (cosine), never a deleted one."""
        if k < 1:
            raise UserError(f"k must be at least 1 (got {k})", hint="pass -k 1 or more")
        started = time.perf_counter()
        vector = self.index.embedder.embed([question])  # [1, dim]
        embedded = time.perf_counter()
        labels, scores = self.index.search_vectors(vector, k, ef)
        searched = time.perf_counter()
        return SearchResult(question, self.index.hits(labels[0], scores[0]), (embedded - started) * 1e3,
                            (searched - embedded) * 1e3, k, max(ef or self.ef, min(k, len(self.index.chunks))))

    def prompt(self, question: str, count_tokens: Callable[[str], int], budget: int, *, k: int = 5,
               ef: int | None = None, **options) -> RagPrompt:
        """Search, then ``build_rag_prompt`` (``options``: system, system_role, label). The result's
        ``timings`` hold embed_ms, search_ms and assembly_ms; ``retrieval`` the SearchResult."""
        result = self.search(question, k, ef=ef)
        prompt = build_rag_prompt(question, result.hits, count_tokens, budget, **options)
        return replace(prompt, retrieval=result)


# --- prompt assembly ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A source as the prompt numbers it. ``text`` is what the prompt holds: the chunk, or when
    ``truncated`` its prefix (``hit.text.startswith(text)``)."""

    number: int
    hit: Hit
    text: str
    truncated: bool = False

    def to_json(self) -> dict:
        return {"number": self.number, "source": self.hit.source, "start": self.hit.start,
                "end": self.hit.start + len(self.text), "score": self.hit.score, "chunk_id": self.hit.chunk_id,
                "truncated": self.truncated}


@dataclass(frozen=True)
class RagPrompt:
    """The assembled prompt: chat ``messages`` (for a chat template) and the same as plain ``text``.

    ``sources`` are exactly the sources the model is given, numbered as in the prompt; ``tokens`` is the
    prompt's size by the caller's ``count_tokens`` (≤ ``budget``); ``dropped`` hits did not fit.
    """

    messages: list[dict[str, str]]
    text: str
    sources: list[Source]
    tokens: int
    budget: int
    dropped: int
    assembly_ms: float = field(default=0.0, compare=False)
    retrieval: SearchResult | None = field(default=None, compare=False)  # set by Retriever.prompt

    @property
    def timings(self) -> dict[str, float]:
        """embed_ms and search_ms (when retrieved through ``Retriever.prompt``) and assembly_ms."""
        return (self.retrieval.timings if self.retrieval else {}) | {"assembly_ms": self.assembly_ms}

    def to_json(self) -> dict:
        return {"messages": self.messages, "tokens": self.tokens, "budget": self.budget, "dropped": self.dropped,
                "timings": self.timings, "sources": [s.to_json() for s in self.sources]}


def build_rag_prompt(question: str, hits: Sequence[Hit], count_tokens: Callable[[str], int], budget: int, *,
                     system: str = DEFAULT_SYSTEM, system_role: bool = True,
                     label: Callable[[Hit], str] | None = None) -> RagPrompt:
    """Fit as many hits as the budget allows (in rank order) into a prompt with numbered sources.

    ``count_tokens``: the LLM tokenizer's count of a text. ``budget``: tokens the system + user text may use
    (the caller subtracts the chat template's own tokens and the room kept for the answer). A hit that does
    not fit whole is cut at a word boundary if at least ``MIN_SOURCE_TOKENS`` of it fit; later hits are
    then dropped. Raises UserError when even the question without sources exceeds the budget.

    ``system_role=False`` puts the instruction at the top of the user message instead of a system message
    (DeepSeek-R1's usage recommendations: no system prompt, all instructions in the user turn).
    """
    started = time.perf_counter()
    label = label or source_label
    blocks: list[str] = []
    sources: list[Source] = []
    def assemble(parts: list[str]) -> tuple[list[dict[str, str]], str]:
        return _assemble(system, question, parts, system_role)

    base = assemble(blocks)
    if count_tokens(base[1]) > budget:
        raise UserError(f"the question alone takes {count_tokens(base[1])} tokens, over the context budget of "
                        f"{budget}", hint="ask a shorter question or raise the context length / budget")
    for hit in _unique(hits):
        number = len(sources) + 1
        header = f"[{number}] {label(hit)}\n"
        fitted = _fit(lambda body, h=header: assemble([*blocks, h + body])[1],
                      hit.text, count_tokens, budget)
        if fitted is None:
            break
        truncated = len(fitted) < len(hit.text)
        blocks.append(header + fitted + (ELLIPSIS if truncated else ""))
        sources.append(Source(number, hit, fitted, truncated))
        if truncated:
            break
    messages, text = assemble(blocks)
    return RagPrompt(messages, text, sources, count_tokens(text), budget, len(_unique(hits)) - len(sources),
                     (time.perf_counter() - started) * 1e3)


def source_label(hit: Hit) -> str:
    """``name.md:120-980`` — file name and character span of the chunk."""
    return f"{Path(hit.source).name}:{hit.start}-{hit.end}"


def _unique(hits: Sequence[Hit]) -> list[Hit]:
    seen: set[int] = set()
    return [h for h in hits if not (h.chunk_id in seen or seen.add(h.chunk_id))]


def _assemble(system: str, question: str, blocks: list[str], system_role: bool) -> tuple[list[dict[str, str]], str]:
    user = ("Sources:\n\n" + "\n\n".join(blocks) + "\n\n" if blocks else "") + f"Question: {question}"
    text = f"{system}\n\n{user}"
    if system_role:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], text
    return [{"role": "user", "content": text}], text


def _fit(render: Callable[[str], str], body: str, count_tokens: Callable[[str], int], budget: int) -> str | None:
    """``body`` if the rendered prompt fits, else its longest word-boundary prefix that fits (rendered with
    an ellipsis), else None.

    The prefix is searched by counting the prefix alone against the room the rest of the prompt leaves
    (cheap: short strings), then checked once on the whole prompt; token merges across the boundary can
    make the whole a little larger than the parts, in which case the room shrinks and the search repeats.
    """
    if count_tokens(render(body)) <= budget:
        return body
    room = budget - count_tokens(render(""))
    cuts = [m.start() for m in re.finditer(r"\s+", body)]
    while room >= MIN_SOURCE_TOKENS:
        best = _longest_prefix(body, cuts, count_tokens, room)
        if best is None or count_tokens(body[:best]) < MIN_SOURCE_TOKENS:
            return None
        if count_tokens(render(body[:best] + ELLIPSIS)) <= budget:
            return body[:best]
        room -= 4
    return None


def _longest_prefix(body: str, cuts: list[int], count_tokens: Callable[[str], int], room: int) -> int | None:
    """The last word boundary whose prefix (plus the ellipsis) counts at most ``room`` tokens."""
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:  # binary search: the count grows with the prefix
        mid = (lo + hi) // 2
        if count_tokens(body[:cuts[mid]] + ELLIPSIS) <= room:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return best


def cited_sources(answer: str, sources: Sequence[Source]) -> list[Source]:
    """The sources an answer cites as [n] (in order of first citation)."""
    by_number = {s.number: s for s in sources}
    cited: list[Source] = []
    for match in re.finditer(r"\[(\d+)\]", answer):
        source = by_number.get(int(match.group(1)))
        if source and source not in cited:
            cited.append(source)
    return cited
