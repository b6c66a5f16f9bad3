"""Retrieval-augmented answers over a bundle: retrieve → fit numbered sources into the context → chat template.

The budget for sources is what the context has left after the chat template's own tokens (rendered with
the real history and an empty question), the room kept for the answer and a small margin for R1's forced
``<think>`` opening. Instructions and sources go in the user turn (``system_role=False``): it works with
every template, and DeepSeek recommends it for R1 (no system prompt). The history that later turns see
keeps the user's question only, not the sources, so a conversation does not fill up with old excerpts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsedge.errors import UserError
from dsedge.runtime.chat import ChatResult, ChatStream, load_chat_template, prepare_prompt

THINK_MARGIN = 8  # tokens for an appended "<think>\n" and tokenizer merges at the seams


@dataclass
class RagResult(ChatResult):
    """A chat result plus the sources the model was given (numbered as in the prompt) and retrieval timings."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites as [n]
    retrieval: dict[str, float] = field(default_factory=dict)  # embed_ms, search_ms, assembly_ms
    show_sources: bool = field(default=False, repr=False)  # a rendering choice of the CLI, not data

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "show_sources"}


def open_retriever(engine, index: str | Path | None):
    """The retriever for ``index``, else the index embedded in the bundle (``retriever/``), else None."""
    from dsedge.retrieval import Retriever

    threads = engine.session_config.threads
    if index is not None:
        return Retriever.open(index, threads=threads)
    if engine.manifest.data.get("retriever"):
        # The bundle's own sha256 check already covered these files; paths are still checked on open.
        return Retriever.open(engine.manifest.root / "retriever", verify=False, threads=threads)
    return None


def rag_prompt(engine, question: str, *, history: list[dict] | None = None, k: int = 5,
               max_new_tokens: int = 256, template=None):
    """Retrieve for ``question`` and assemble the user turn; returns the RagPrompt."""
    retriever = engine.retriever
    if retriever is None:
        raise UserError("no index to retrieve from", where=str(engine.manifest.root),
                        hint="pass --index INDEX (built with `dsedge index build`) or export with --index")
    codec = engine.codec
    if codec is None:
        raise UserError("this bundle has no tokenizer, so it cannot build a prompt", where=str(engine.manifest.root))
    def count_tokens(text: str) -> int:  # as prepare_prompt encodes a rendered prompt: no extra specials
        return len(codec.tokenizer.encode(text, add_special_tokens=False).ids)

    chat_template = load_chat_template(engine, template)
    frame = chat_template.render([*(history or []), {"role": "user", "content": ""}], add_generation_prompt=True)
    budget = engine.max_context - max_new_tokens - count_tokens(frame) - THINK_MARGIN
    if budget < 1:
        raise UserError(f"no room for sources: the context ({engine.max_context} tokens) is taken by the "
                        f"conversation and the {max_new_tokens} tokens kept for the answer", where="rag",
                        hint="lower --max-new-tokens, start a new conversation, or re-export with a larger "
                             "--max-context")

    return retriever.prompt(question, count_tokens, budget, k=k, system_role=False)


def ask(engine, question: str, *, k: int = 5, max_new_tokens: int = 256, history: list[dict] | None = None,
        template=None, force_think: bool | None = None, stream: bool = False, **sampling):
    """Answer ``question`` from the retrieved sources: a RagResult, or with ``stream=True`` a ChatStream whose
    ``result`` becomes a RagResult when iteration ends."""
    rag = rag_prompt(engine, question, history=history, k=k, max_new_tokens=max_new_tokens, template=template)
    prompt = prepare_prompt(engine, [*(history or []), *rag.messages], template=template, force_think=force_think)
    replies = RagStream(engine, prompt, max_new_tokens, sampling, rag)
    if stream:
        return replies
    for _ in replies:
        pass
    return replies.result


class RagStream(ChatStream):
    """A ChatStream whose final result carries the sources and retrieval timings."""

    def __init__(self, engine, prompt, max_new_tokens: int, sampling: dict, rag, on_done=None):
        super().__init__(engine, prompt, max_new_tokens, sampling, on_done=None)
        self.rag, self._after = rag, on_done

    def __iter__(self):
        yield from super().__iter__()
        self.result = with_sources(self.result, self.rag)
        if self._after:
            self._after(self.result)


def with_sources(result: ChatResult, rag) -> RagResult:
    from dsedge.retrieval import cited_sources

    return RagResult(**result.__dict__, sources=[s.to_json() for s in rag.sources],
                     cited=[s.number for s in cited_sources(result.answer, rag.sources)],
                     retrieval={k: round(v, 3) for k, v in rag.timings.items()})
