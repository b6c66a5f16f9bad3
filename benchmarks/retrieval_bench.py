"""Retrieval benchmark: build throughput (embedder and index separately), query latency p50/p90 (embed +
search) and recall@10 at ef 16/32/64/128, and index memory — dsedge's hnswlib index against exact numpy
search and faiss ``IndexHNSWFlat`` (same M, ef_construction, ef), all in the same run on the same vectors.

Corpus: dsedge/demo/data/heldout.txt (20 pages of the Python 3.11 docs, PSF license) or ``--docs``.
Queries: sentences sampled from the corpus (not chunk-aligned), embedded like any question.

    .venv/bin/python benchmarks/retrieval_bench.py [--docs DIR] [--chunk-tokens 64] [--queries 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# Search is timed one query at a time on one thread for every method (hnswlib num_threads=1, faiss
# omp 1, numpy's BLAS 1): multithreaded BLAS on a tiny matrix-vector product only adds contention.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
CORPUS = ROOT / "dsedge" / "demo" / "data" / "heldout.txt"
EFS = (16, 32, 64, 128)
K = 10


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


# --- corpus ---------------------------------------------------------------------------------------------

def load_corpus(docs: Path | None) -> dict[str, tuple[str, bytes]]:
    from dsedge.retrieval.chunking import collect_documents, read_document

    paths = collect_documents([docs]) if docs else [CORPUS]
    return {p.as_posix(): read_document(p) for p in paths}


def sample_queries(texts: dict, n: int, seed: int = 0) -> list[str]:
    sentences = [s.strip() for text, _ in texts.values() for s in re.split(r"(?<=[.?!])\s+", text)]
    sentences = [s for s in sentences if 6 <= len(s.split()) <= 40 and not s.startswith((".. ", ">>>"))]
    rng = np.random.default_rng(seed)
    return [sentences[i] for i in rng.choice(len(sentences), size=min(n, len(sentences)), replace=False)]


# --- build ----------------------------------------------------------------------------------------------

def build(texts, embedder, params) -> tuple[object, dict]:
    """dsedge's build path: chunk, embed (length-sorted batches), insert into hnswlib."""
    from dsedge.retrieval.index import new_index

    index = new_index(params, embedder, capacity=1024)
    timer: dict = {}
    added, total_s = timed(index.add_documents, texts, timer)  # chunking + embedding + insertion
    tokens = embedder.stats.tokens
    return index, {"chunks": added, "embed_tokens": tokens, "padded_tokens": embedder.stats.padded_tokens,
                   "embed_s": timer["embed_s"], "index_s": timer["index_s"], "total_s": total_s,
                   "embed_chunks_per_s": added / timer["embed_s"], "embed_tokens_per_s": tokens / timer["embed_s"],
                   "hnswlib_insert_chunks_per_s": added / timer["index_s"]}


def unsorted_embedding(embedder, chunks: list[str], batch: int = 8) -> dict:
    """The same chunks embedded in document order (padding to each batch's longest): what sorting saves."""
    from dsedge.retrieval.embedder import EmbedStats

    embedder.stats = EmbedStats()
    _, seconds = timed(lambda: [embedder._run([e.ids for e in embedder.tokenizer.encode_batch(chunks[i:i + batch])])
                                for i in range(0, len(chunks), batch)])
    return {"chunks": len(chunks), "seconds": seconds, "padded_tokens": embedder.stats.padded_tokens,
            "tokens": embedder.stats.tokens, "chunks_per_s": len(chunks) / seconds}


def sorted_embedding(embedder, chunks: list[str], batch: int = 8) -> dict:
    from dsedge.retrieval.embedder import EmbedStats

    embedder.stats = EmbedStats()
    _, seconds = timed(embedder.embed, chunks, batch_size=batch, batch_tokens=10**9)
    return {"chunks": len(chunks), "seconds": seconds, "padded_tokens": embedder.stats.padded_tokens,
            "tokens": embedder.stats.tokens, "chunks_per_s": len(chunks) / seconds}


def padding_comparison(embedder, chunks: list[str], repeats: int = 3) -> dict:
    """Length-sorted vs document-order batches, alternated ``repeats`` times; the median run of each
    (on a shared machine a single pair of runs can be dominated by someone else's load)."""
    runs: dict[str, list[dict]] = {"sorted": [], "document_order": []}
    for _ in range(repeats):
        runs["sorted"].append(sorted_embedding(embedder, chunks))
        runs["document_order"].append(unsorted_embedding(embedder, chunks))
    return {name: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] | {"runs_s": [r["seconds"] for r in rs]}
            for name, rs in runs.items()}


def build_faiss(vectors: np.ndarray, M: int, ef_construction: int):  # noqa: N803
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    _, seconds = timed(index.add, vectors)
    return index, seconds


def build_hnswlib_threads(vectors, ids, params, threads: int) -> float:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=params.M, ef_construction=params.ef_construction, random_seed=100)
    return timed(index.add_items, vectors, ids, num_threads=threads)[1]


# --- search ---------------------------------------------------------------------------------------------

def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Brute force one query at a time (as a device would): q @ Vᵀ, argpartition, sort the k."""
    out, times = [], []
    for q in queries:
        started = time.perf_counter()
        scores = vectors @ q  # [N]
        top = np.argpartition(-scores, k)[:k]
        out.append(top[np.argsort(-scores[top])])
        times.append(time.perf_counter() - started)
    return np.stack(out), times


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact, strict=True)]))


def hnswlib_search(index, queries, ef: int) -> tuple[np.ndarray, list[float]]:
    index.hnsw.set_ef(ef)
    out, times = [], []
    for q in queries:
        started = time.perf_counter()
        labels, _ = index.hnsw.knn_query(q[None], k=K, num_threads=1)
        times.append(time.perf_counter() - started)
        out.append(labels[0])
    return np.stack(out).astype(np.int64), times


def faiss_search(index, queries, ef: int) -> tuple[np.ndarray, list[float]]:
    index.hnsw.efSearch = ef
    out, times = [], []
    for q in queries:
        started = time.perf_counter()
        _, labels = index.search(q[None], K)
        times.append(time.perf_counter() - started)
        out.append(labels[0])
    return np.stack(out), times


def embed_latency(embedder, questions: list[str]) -> tuple[np.ndarray, list[float]]:
    out, times = [], []
    for q in questions:
        vector, seconds = timed(embedder.embed_query, q)
        out.append(vector)
        times.append(seconds)
    return np.stack(out), times


def rag_assembly(retriever, questions: list[str]) -> dict:
    """End to end through Retriever.search (default ef) and build_rag_prompt with an LLM tokenizer's count."""
    from tokenizers import Tokenizer

    from dsedge.retrieval.rag import build_rag_prompt

    tok = Tokenizer.from_file(str(ROOT / "dsedge" / "demo" / "models" / "qwen2-tiny" / "tokenizer.json"))

    def count(text):
        return len(tok.encode(text, add_special_tokens=False).ids)

    search, assemble = [], []
    for q in questions:
        result, seconds = timed(retriever.search, q, 5)
        search.append(seconds)
        assemble.append(build_rag_prompt(q, result.hits, count, 1024).assembly_ms / 1e3)
    return {"retriever_search_ms_p50": pct(search, 50), "retriever_search_ms_p90": pct(search, 90),
            "prompt_assembly_ms_p50": pct(assemble, 50), "prompt_assembly_ms_p90": pct(assemble, 90)}


# --- main -----------------------------------------------------------------------------------------------

def run(args) -> dict:
    import faiss

    from dsedge.retrieval import Embedder, IndexParams, default_embedder_dir
    from dsedge.retrieval.index import hnsw_memory_bytes
    from dsedge.retrieval.rag import Retriever

    faiss.omp_set_num_threads(1)
    texts = load_corpus(args.docs)
    embedder = Embedder.open(default_embedder_dir())
    embedder.embed(["warm up"] * 4)
    params = IndexParams(chunk_tokens=args.chunk_tokens, overlap=args.overlap, M=args.M,
                         ef_construction=args.ef_construction)
    embedder.stats.__init__()
    index, build_row = build(texts, embedder, params)
    ids = np.array(sorted(index.chunks), dtype=np.uint64)
    vectors = np.asarray(index.hnsw.get_items(ids), dtype=np.float32)
    chunk_texts = [index.chunks[int(i)]["text"] for i in ids]
    subset = chunk_texts[:: max(1, len(chunk_texts) // 128)]
    padding = padding_comparison(embedder, subset)
    fa, faiss_build_s = build_faiss(vectors, args.M, args.ef_construction)
    build_row |= {"faiss_insert_chunks_per_s": len(vectors) / faiss_build_s,
                  "hnswlib_insert_1_thread_chunks_per_s": len(vectors) / build_hnswlib_threads(vectors, ids, params, 1),
                  "faiss_threads": 1, "embedding_padding": padding}

    questions = sample_queries(texts, args.queries)
    queries, embed_times = embed_latency(embedder, questions)
    exact, exact_times = exact_topk(queries, vectors, K)
    exact_ids = ids[exact].astype(np.int64)
    rows = [_row("numpy exact", None, 1.0, exact_times, embed_times)]
    for ef in EFS:
        found, times = hnswlib_search(index, queries, ef)
        rows.append(_row("dsedge (hnswlib)", ef, recall(found, exact_ids), times, embed_times))
        found, times = faiss_search(fa, queries, ef)
        rows.append(_row("faiss IndexHNSWFlat", ef, recall(ids[found].astype(np.int64), exact_ids), times, embed_times))

    memory = {"vectors_fp32_bytes": int(vectors.nbytes), "hnswlib_bytes": hnsw_memory_bytes(index.hnsw),
              "faiss_bytes": int(len(faiss.serialize_index(fa)))}
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "bench.index", embedder_from=embedder.root)
        retriever = Retriever.open(Path(tmp) / "bench.index")
        retriever.search("warm up", 5)
        e2e = rag_assembly(retriever, questions[:100])
    return {"corpus": {"documents": len(texts), "characters": sum(len(t) for t, _ in texts.values()),
                       "chunks": len(vectors), "chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
                       "queries": len(questions)},
            "params": {"M": args.M, "ef_construction": args.ef_construction, "k": K},
            "build": build_row,
            "embed_query_ms_p50": pct(embed_times, 50), "embed_query_ms_p90": pct(embed_times, 90),
            "search": rows, "memory": memory, "end_to_end": e2e,
            "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}}


def _row(method: str, ef: int | None, rec: float, times: list[float], embed_times: list[float]) -> dict:
    total = np.add(embed_times, times)  # one question = embed it, then search
    return {"method": method, "ef": ef, "recall@10": rec, "search_ms_p50": pct(times, 50),
            "search_ms_p90": pct(times, 90), "query_ms_p50": pct(total, 50), "query_ms_p90": pct(total, 90)}


def print_table(result: dict) -> None:
    c, b = result["corpus"], result["build"]
    print(f"corpus: {c['documents']} documents, {c['characters']} chars -> {c['chunks']} chunks of <= "
          f"{c['chunk_tokens']} tokens; {c['queries']} queries")
    print(f"build: embed {b['embed_chunks_per_s']:.1f} chunks/s ({b['embed_tokens_per_s']:.0f} tokens/s); insert "
          f"hnswlib {b['hnswlib_insert_chunks_per_s']:.0f} chunks/s (all threads), "
          f"{b['hnswlib_insert_1_thread_chunks_per_s']:.0f} (1 thread); faiss {b['faiss_insert_chunks_per_s']:.0f} "
          "(1 thread)")
    for name, p in b["embedding_padding"].items():
        print(f"  embedding {name:>14}: {p['chunks_per_s']:.1f} chunks/s, padded/real tokens "
              f"{p['padded_tokens'] / p['tokens']:.2f}")
    e = (result["embed_query_ms_p50"], result["embed_query_ms_p90"])
    print(f"query embedding: p50 {e[0]:.2f} ms, p90 {e[1]:.2f} ms")
    print(f"{'method':<22}{'ef':>5}{'recall@10':>11}{'search p50':>12}{'p90 ms':>9}{'embed+search p50':>18}"
          f"{'p90 ms':>9}")
    for r in result["search"]:
        print(f"{r['method']:<22}{r['ef'] or '':>5}{r['recall@10']:>11.4f}{r['search_ms_p50']:>12.3f}"
              f"{r['search_ms_p90']:>9.3f}{r['query_ms_p50']:>18.2f}{r['query_ms_p90']:>9.2f}")
    m = result["memory"]
    print(f"memory: vectors {m['vectors_fp32_bytes'] / 2**20:.2f} MiB, hnswlib {m['hnswlib_bytes'] / 2**20:.2f} MiB, "
          f"faiss {m['faiss_bytes'] / 2**20:.2f} MiB")
    print("end to end:", json.dumps(result["end_to_end"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, help="folder of documents (default: the shipped heldout.txt)")
    parser.add_argument("--chunk-tokens", type=int, default=64,
                        help="smaller than the default 200 to get more vectors from a small corpus")
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--M", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--json", type=Path, default=OUT / "retrieval_bench.json")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
