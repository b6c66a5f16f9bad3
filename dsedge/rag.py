"""Retrieval-augmented answers: a retriever (``dsedge.retrieval``) feeding an engine (``dsedge.runtime``).

This module sits above both packages on purpose: it is the only place that knows both an index and an
engine, so the runtime never imports retrieval and retrieval never imports the engine (its embedder only
uses ``dsedge.runtime.session``). Like the CLI, it composes them.

    from dsedge.rag import ask, open_retriever
    retriever = open_retriever(engine, "docs.index")        # or open_retriever(engine): the bundle's own index
    answer = ask(engine, "How do I rotate log files?", retriever=retriever, k=5)

How sources are fitted into the context: ``dsedge.runtime.chat.sources_prompt``. The history that later turns
see keeps the user's question only, not the sources, so a conversation does not fill up with old excerpts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsedge.errors import UserError
from dsedge.retrieval import Retriever, cited_sources
from dsedge.runtime.chat import ChatResult, ChatStream, prepare_prompt, sources_prompt

EMBEDDED_DIR = "retriever"  # where `dsedge export --index` puts the bundle's own index
__all__ = ["RagResult", "RagSources", "ask", "open_retriever", "rag_prompt", "with_sources"]


@dataclass
class RagResult(ChatResult):
    """A chat result plus the sources the model was given (numbered as in the prompt) and retrieval timings."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites as [n]
    retrieval: dict[str, float] = field(default_factory=dict)  # embed_ms, search_ms, assembly_ms
    dropped: int = 0  # retrieved sources that did not fit in the context
    show_sources: bool = field(default=False, repr=False)  # a rendering choice of the CLI, not data

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "show_sources"}


def open_retriever(engine, index: str | Path | None = None) -> Retriever | None:
    """The retriever for ``index``, else the index embedded in the engine's bundle (``retriever/``), else None.

    Opening verifies the index as the bundle is verified (the engine's mode: recorded fast start, ``--verify``
    full, or off), so a bad index fails here, not mid-conversation. An embedded index is chained to the bundle:
    its ``manifest.json`` is a listed, verified bundle file (its sha256 in the bundle's manifest), and that
    manifest's sha256s cover every index file; ``retriever/`` must be a real directory of the bundle.
    """
    threads = engine.session_config.threads
    manifest = engine.manifest
    if index is not None:
        return Retriever.open(index, threads=threads, verify=manifest.mode)
    embedded = manifest.data.get("retriever")
    if embedded:
        folder = embedded.get("dir", EMBEDDED_DIR) if isinstance(embedded, dict) else EMBEDDED_DIR
        if folder != EMBEDDED_DIR:
            raise UserError(f"manifest.json retriever.dir is {folder!r}; bundles embed their index in "
                            f"{EMBEDDED_DIR}/", where=str(manifest.root), hint="re-export the bundle with --index")
        manifest.path(f"{EMBEDDED_DIR}/manifest.json", what="embedded index manifest")
        root = manifest.checked.directory(EMBEDDED_DIR, what="embedded index")
        return Retriever.open(root, verify=manifest.mode, threads=threads)
    return None


def rag_prompt(engine, retriever, question: str, *, history: list[dict] | None = None, k: int = 5,
               max_new_tokens: int = 256, template=None):
    """Retrieve for ``question`` and assemble the user turn within the context; returns the RagPrompt."""
    return sources_prompt(engine, retriever, question, history=history, k=k, max_new_tokens=max_new_tokens,
                          template=template)


def ask(engine, question: str, *, retriever: Retriever | None = None, index: str | Path | None = None, k: int = 5,
        max_new_tokens: int = 256, history: list[dict] | None = None, template=None,
        force_think: bool | None = None, stream: bool = False, **sampling):
    """Answer ``question`` from retrieved sources: a RagResult, or with ``stream=True`` a ChatStream whose
    ``result`` is a RagResult when iteration ends.

    ``retriever`` (reuse one across questions) wins; else ``index`` is opened, else the bundle's own index.
    """
    retriever = retriever if retriever is not None else _required_retriever(engine, index)
    rag = rag_prompt(engine, retriever, question, history=history, k=k, max_new_tokens=max_new_tokens,
                     template=template)
    prompt = prepare_prompt(engine, [*(history or []), *rag.messages], template=template, force_think=force_think)
    replies = ChatStream(engine, prompt, max_new_tokens, sampling, finish=lambda result: with_sources(result, rag))
    return replies if stream else replies.run()


class RagSources:
    """RAG mode of a ``ChatSession``: each question is sent with the ``k`` best sources from ``retriever``."""

    def __init__(self, retriever: Retriever, k: int = 5):
        if retriever is None:
            raise UserError("no index to retrieve from", where="rag",
                            hint="pass --index INDEX (built with `dsedge index build`) or export with --index")
        self.retriever, self.k = retriever, k

    def augment(self, engine, question: str, *, history: list[dict], template, max_new_tokens: int):
        rag = rag_prompt(engine, self.retriever, question, history=history, k=self.k, max_new_tokens=max_new_tokens,
                         template=template)
        return rag.messages, lambda result: with_sources(result, rag)


def with_sources(result: ChatResult, rag) -> RagResult:
    return RagResult(**result.__dict__, sources=[s.to_json() for s in rag.sources],
                     cited=[s.number for s in cited_sources(result.answer, rag.sources)],
                     retrieval={k: round(v, 3) for k, v in rag.timings.items()}, dropped=rag.dropped)


def _required_retriever(engine, index) -> Retriever:
    retriever = open_retriever(engine, index)
    if retriever is None:
        raise UserError("no index to retrieve from", where=str(engine.manifest.root),
                        hint="pass an index (built with `dsedge index build`) or export with --index")
    return retriever
