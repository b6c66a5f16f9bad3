"""Retrieval-augmented prompts: search an index, fit numbered sources into the LLM's context budget.

``Retriever`` answers "which chunks" (embedding + HNSW search, timed); ``build_rag_prompt`` answers "what
does the model see": a system instruction, the sources numbered [1], [2], ... in rank order, and the
question — counted in the **LLM's** tokens through the ``count_tokens`` function the caller passes (the
embedder's word pieces say nothing about the generator's vocabulary); it is a pure function. Torch-free.
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
SOURCES_HEADING, SEPARATOR = "Sources:\n\n", "\n\n"
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
    hits = _unique(hits)

    def assemble(sources: list[Source]) -> tuple[list[dict[str, str]], str]:
        return _assemble(system, question, [_block(s, label) for s in sources], system_role)

    base = count_tokens(assemble([])[1])
    if base > budget:
        raise UserError(f"the question alone takes {base} tokens, over the context budget of {budget}",
                        hint="ask a shorter question or raise the context length / budget")
    # Each block is counted once, with its separator, and the counts summed — re-counting the whole prompt per
    # source would cost O(sources x prompt). The sum is checked exactly once at the end (_verified).
    used = base + count_tokens(SOURCES_HEADING)
    sources: list[Source] = []
    for hit in hits:
        source, cost = _place(len(sources) + 1, hit, label, count_tokens, budget - used)
        if source is None:
            break
        sources.append(source)
        used += cost
        if source.truncated:
            break
    messages, text, tokens = _verified(assemble, sources, count_tokens, budget)
    return RagPrompt(messages, text, sources, tokens, budget, len(hits) - len(sources),
                     (time.perf_counter() - started) * 1e3)


def source_label(hit: Hit) -> str:
    """``name.md:120-980`` — file name and character span of the chunk."""
    return f"{Path(hit.source).name}:{hit.start}-{hit.end}"


def _unique(hits: Sequence[Hit]) -> list[Hit]:
    seen: set[int] = set()
    return [h for h in hits if not (h.chunk_id in seen or seen.add(h.chunk_id))]


def _block(source: Source, label: Callable[[Hit], str]) -> str:
    return f"[{source.number}] {label(source.hit)}\n{source.text}{ELLIPSIS if source.truncated else ''}"


def _assemble(system: str, question: str, blocks: list[str], system_role: bool) -> tuple[list[dict[str, str]], str]:
    user = (SOURCES_HEADING + "".join(b + SEPARATOR for b in blocks) if blocks else "") + f"Question: {question}"
    text = f"{system}{SEPARATOR}{user}"
    if system_role:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], text
    return [{"role": "user", "content": text}], text


def _place(number: int, hit: Hit, label, count_tokens, room: int) -> tuple[Source | None, int]:
    """The hit as source ``number`` — whole if it fits ``room`` tokens, else a prefix, else None — and its cost."""
    whole = Source(number, hit, hit.text)
    cost = count_tokens(_block(whole, label) + SEPARATOR)
    if cost <= room:
        return whole, cost
    header = count_tokens(_block(Source(number, hit, "", True), label) + SEPARATOR)
    prefix = _prefix_within(hit.text, count_tokens, room - header)
    if prefix is None:
        return None, 0
    cut = Source(number, hit, prefix, True)
    return cut, count_tokens(_block(cut, label) + SEPARATOR)


def _verified(assemble, sources: list[Source], count_tokens, budget: int):
    """Messages, text and exact token count; if tokens merged across block boundaries pushed the prompt over
    the budget (the per-block sum is usually exact), shorten the last source until it fits."""
    while True:
        messages, text = assemble(sources)
        tokens = count_tokens(text)
        if tokens <= budget or not sources:
            return messages, text, tokens
        last = sources.pop()
        prefix = _prefix_within(last.text, count_tokens, count_tokens(last.text) - (tokens - budget) - 2)
        if prefix is not None:
            sources.append(Source(last.number, last.hit, prefix, True))


def _prefix_within(body: str, count_tokens: Callable[[str], int], room: int) -> str | None:
    """The longest word-boundary prefix of ``body`` that counts at most ``room`` tokens with the ellipsis, or
    None when fewer than ``MIN_SOURCE_TOKENS`` fit."""
    if room < MIN_SOURCE_TOKENS:
        return None
    cuts = [m.start() for m in re.finditer(r"\s+", body)]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:  # binary search: the count grows with the prefix
        mid = (lo + hi) // 2
        if count_tokens(body[:cuts[mid]] + ELLIPSIS) <= room:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    if best is None or count_tokens(body[:best]) < MIN_SOURCE_TOKENS:
        return None
    return body[:best]


def cited_sources(answer: str, sources: Sequence[Source]) -> list[Source]:
    """The sources an answer cites as [n] (in order of first citation)."""
    by_number = {s.number: s for s in sources}
    cited: list[Source] = []
    for match in re.finditer(r"\[(\d+)\]", answer):
        source = by_number.get(int(match.group(1)))
        if source and source not in cited:
            cited.append(source)
    return cited
