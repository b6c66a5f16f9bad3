"""Retrieval on the device: chunking, an ONNX sentence embedder, an hnswlib index and RAG prompt assembly.

Torch-free (numpy, onnxruntime, tokenizers, hnswlib); only ``dsedge.retrieval.convert`` — the one-time
conversion of the default embedder — imports torch, and only to validate its graph.

    from dsedge.retrieval import Retriever
    retriever = Retriever.open("docs.index")
    result = retriever.search("How do I rotate log files?", k=5)        # hits + embed_ms / search_ms
    prompt = retriever.prompt("How do I rotate log files?", count_tokens, budget=1500)  # numbered sources
"""

from __future__ import annotations

from dsedge.retrieval.chunking import Chunk, chunk_text
from dsedge.retrieval.embedder import Embedder, default_embedder_dir
from dsedge.retrieval.index import (
    BuildReport,
    Hit,
    Index,
    IndexParams,
    IndexStats,
    build_index,
    copy_index,
    index_stats,
    update_index,
)
from dsedge.retrieval.rag import RagPrompt, Retriever, SearchResult, Source, build_rag_prompt, cited_sources

__all__ = ["BuildReport", "Chunk", "Embedder", "Hit", "Index", "IndexParams", "IndexStats", "RagPrompt",
           "Retriever", "SearchResult", "Source", "build_index", "build_rag_prompt", "chunk_text", "cited_sources",
           "copy_index", "default_embedder_dir", "index_stats", "update_index"]
