"""`dsedge profile`: where a bundle's time goes — TTFT, decode ms/token, per graph, per layer, per expert.

Method (as gpt-fast and llama-bench do): a warm-up trial, then N timed trials of prefill + greedy decode
with EOS ignored, so every trial does the same work. Prompts are seeded random token ids, so results do
not depend on a tokenizer. Per-graph time comes from timers around every ``session.run``; what is left of
a decode step is the runtime's own overhead (sampling, cache writes, routing glue). With ``by_op`` one more
trial runs under onnxruntime's node profiler and splits the time by layer and operator type.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsedge.contract import EXPERT_ROLES
from dsedge.errors import UserError
from dsedge.rss import peak_rss_bytes
from dsedge.runtime import load_bundle
from dsedge.runtime.chat import prepare_prompt, sources_prompt
from dsedge.runtime.decode import generate_step
from dsedge.runtime.profile_plot import write_plot  # matplotlib is imported inside it, only for --plot

DEFAULT_QUESTION = "How do I install it and run the first example?"


@dataclass
class ProfileReport:
    bundle: str
    layout: str
    providers: list[str]
    threads: int | None
    prompt_tokens: int
    gen_tokens: int
    trials: int
    ttft_ms: dict[str, float]
    prefill_tokens_per_s: float
    decode_ms_per_token: dict[str, float]
    decode_tokens_per_s: float
    outside_ort_ms_per_token: float
    expert_load_ms_per_token: float
    graphs: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    experts: dict[str, Any] | None
    peak_rss_bytes: int
    graph_bytes: int  # graphs + their weights on disk
    ops: list[dict[str, Any]] = field(default_factory=list)
    retrieval: dict[str, Any] | None = None
    plot: str | None = None
    speculative: dict[str, Any] | None = None  # with engine.speculation: acceptance, tokens/verify, speedup vs off
    # Outside the layers, ms per decoded token (partitioned: the prelude and head graphs; monolithic: with
    # by_op, the nodes before and after the layers). None where not measured.
    embed_ms_per_token: float | None = None
    head_ms_per_token: float | None = None
    # Each timed trial's rates (a sweep's ± stddev).
    trial_prefill_tokens_per_s: list[float] = field(default_factory=list)
    trial_decode_tokens_per_s: list[float] = field(default_factory=list)
    # The forward pass ran as one graph (monolithic, or a partitioned bundle whose experts are all resident,
    # composed: dsedge.runtime.compose); its split by layer comes from the node profile, as for monolithic.
    one_graph: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Trial:
    ttft_s: float
    step_s: list[float]
    prefill_graph_s: dict[str, float]
    decode_graph_s: dict[str, float]
    decode_load_s: float  # expert partitions loaded on demand during decode


def profile_bundle(bundle: str | Path, *, target=None, threads: int | None = None, providers: list[str] | None = None,
                   memory_budget_bytes: int | None = None, prefetch_experts: bool = False, compose: bool = True,
                   **options) -> ProfileReport:
    """Load ``bundle`` and profile it (``profile_engine``'s options); see the module docstring for the method.
    ``compose``: as ``load_bundle``'s (False: a partitioned bundle's graphs timed one by one)."""
    engine = load_bundle(bundle, target=target, threads=threads, providers=providers,
                         memory_budget_bytes=memory_budget_bytes, prefetch_experts=prefetch_experts, compose=compose)
    return profile_engine(engine, target=target, memory_budget_bytes=memory_budget_bytes, **options)


def profile_engine(engine, *, prompt_tokens: int = 128, gen_tokens: int = 64, trials: int = 3, by_op: bool = False,
                   seed: int = 0, plot: str | Path | None = None, retriever=None, question: str = DEFAULT_QUESTION,
                   target=None, memory_budget_bytes: int | None = None) -> ProfileReport:
    """Profile prefill and decode of a loaded engine.

    ``retriever`` (e.g. ``dsedge.rag.open_retriever(engine, index)``): also time retrieval for ``question``
    and its share of time to first token. ``by_op`` reloads the bundle under onnxruntime's node profiler with
    the engine's providers and threads, and ``target`` / ``memory_budget_bytes`` as given.
    """
    _check_args(prompt_tokens, gen_tokens, trials)
    if prompt_tokens + gen_tokens > engine.max_context:
        raise UserError(f"{prompt_tokens} prompt + {gen_tokens} generated tokens exceed the bundle's max context "
                        f"({engine.max_context})", where="--prompt-tokens/--gen-tokens",
                        hint="profile fewer tokens or re-export with a larger --max-context")
    bundle = engine.manifest.root
    prompt = _prompt(engine, prompt_tokens, seed)
    _run_trial(engine, prompt, min(gen_tokens, 4))  # warm-up: first-run allocations, page faults, lazy loads
    if getattr(engine, "experts", None) is not None:
        engine.experts.reset_stats()
    speculation = getattr(engine, "speculation", None)
    if speculation is not None:
        speculation.stats.reset()
    runs = [_run_trial(engine, prompt, gen_tokens) for _ in range(trials)]
    report = _report(engine, bundle, runs, prompt_tokens, gen_tokens)
    if speculation is not None:
        report.speculative = _speculative_profile(engine, speculation, prompt, gen_tokens, runs)
    if retriever is not None:
        report.retrieval = _retrieval_profile(engine, retriever, question, trials, gen_tokens)
    if by_op or (plot and report.one_graph):
        report.ops, op_layers, ends = _op_profile(bundle, engine, prompt, gen_tokens, target, memory_budget_bytes)
        if report.one_graph:
            report.layers = op_layers
            report.embed_ms_per_token, report.head_ms_per_token = ends["embed"], ends["head"]
    if plot:
        report.plot = str(write_plot(report, plot))
    return report


def _retrieval_profile(engine, retriever, question: str, trials: int, gen_tokens: int) -> dict[str, Any]:
    """RAG's share of time to first token: embed + search + prompt assembly vs prefilling the assembled prompt."""
    sources_prompt(engine, retriever, question, max_new_tokens=gen_tokens)  # warm-up: embedder session, page cache
    rows, prefill = [], []
    for _ in range(trials):
        rag = sources_prompt(engine, retriever, question, max_new_tokens=gen_tokens)
        rows.append(rag.timings)
        ids = prepare_prompt(engine, rag.messages).token_ids
        started = time.perf_counter()
        engine.logits(ids)
        prefill.append((time.perf_counter() - started) * 1e3)
    stats = {k: float(np.median([r[k] for r in rows])) for k in ("embed_ms", "search_ms", "assembly_ms")}
    retrieval = sum(stats.values())
    ttft = retrieval + float(np.median(prefill))
    return stats | {"prompt_tokens": len(ids), "sources": len(rag.sources), "prefill_ms": float(np.median(prefill)),
                    "ttft_ms": ttft, "share_of_ttft": retrieval / ttft, "question": question}


def _speculative_profile(engine, speculation, prompt: list[int], gen_tokens: int,
                         runs: list[_Trial]) -> dict[str, Any]:
    """The speculative trials' acceptance per draft position and tokens per verify step, and the same number
    of trials with speculation off: decode tokens/s both ways (total decode time over tokens, since a verify
    step's tokens share its time) and whether greedy gave the same tokens (it must)."""
    stats = speculation.stats.to_json()
    speculative_tokens = [e.token_id for e in generate_step(engine, prompt, max_new_tokens=gen_tokens)]
    engine.speculation = None
    try:
        off_runs = [_run_trial(engine, prompt, gen_tokens) for _ in range(len(runs))]
        plain_tokens = [e.token_id for e in generate_step(engine, prompt, max_new_tokens=gen_tokens)]
    finally:
        engine.speculation = speculation
    on, off = _decode_tokens_per_s(runs), _decode_tokens_per_s(off_runs)
    return {"mode": speculation.mode, "draft_tokens": speculation.draft_tokens, **stats,
            "decode_tokens_per_s": on, "off_decode_tokens_per_s": off, "speedup": on / off if off else 0.0,
            "same_tokens": speculative_tokens == plain_tokens}


def _decode_tokens_per_s(runs: list[_Trial]) -> float:
    seconds = sum(sum(r.step_s) for r in runs)
    return sum(len(r.step_s) for r in runs) / seconds if seconds else 0.0


def _check_args(prompt_tokens: int, gen_tokens: int, trials: int) -> None:
    for name, value in (("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens), ("--trials", trials)):
        if value < 1:
            raise UserError(f"{name} must be ≥ 1, got {value}", where=name)


def _prompt(engine, n: int, seed: int) -> list[int]:
    vocab = int(engine.spec["vocab_size"])
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, size=n)]


def _run_trial(engine, prompt: list[int], gen_tokens: int) -> _Trial:
    """Prefill, then ``gen_tokens - 1`` greedy decode steps (the first token comes from the prefill)."""
    engine.timers.reset()
    steps = generate_step(engine, prompt, max_new_tokens=gen_tokens)
    ttft = next(steps).ttft_s
    prefill_graphs = dict(engine.timers.seconds)
    engine.timers.reset()
    loaded_before = _load_seconds(engine)
    step_s = [event.step_s for event in steps]
    return _Trial(ttft, step_s, prefill_graphs, dict(engine.timers.seconds), _load_seconds(engine) - loaded_before)


def _load_seconds(engine) -> float:
    experts = getattr(engine, "experts", None)
    return experts.stats.load_seconds if experts is not None else 0.0


def _report(engine, bundle, runs: list[_Trial], prompt_tokens: int, gen_tokens: int) -> ProfileReport:
    ttft = np.array([r.ttft_s for r in runs]) * 1e3
    steps = np.array([s for r in runs for s in r.step_s] or [np.nan]) * 1e3
    decode_steps = max(1, sum(len(r.step_s) for r in runs))
    graph_decode = _mean_graph_ms(runs, "decode_graph_s", decode_steps)
    graph_prefill = _mean_graph_ms(runs, "prefill_graph_s", len(runs))
    graphs = _graph_rows(engine, graph_prefill, graph_decode)
    ms_per_token = float(np.median(steps))
    load_ms = sum(r.decode_load_s for r in runs) * 1e3 / decode_steps
    experts = engine.experts.stats.to_json() if getattr(engine, "experts", None) is not None else None
    by_kind = {kind: sum(g["decode_ms_per_token"] for g in graphs if g["kind"] == kind) or None
               for kind in ("prelude", "head")}
    return ProfileReport(
        bundle=str(bundle), layout=engine.layout, providers=engine.providers,
        threads=engine.session_config.threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
        trials=len(runs), ttft_ms=_summary(ttft), prefill_tokens_per_s=float(prompt_tokens / np.median(ttft) * 1e3),
        decode_ms_per_token=_summary(steps), decode_tokens_per_s=float(1e3 / ms_per_token) if ms_per_token else 0.0,
        outside_ort_ms_per_token=float(np.mean(steps) - sum(graph_decode.values()) - load_ms),
        expert_load_ms_per_token=load_ms,
        graphs=graphs, layers=_layer_rows(graphs), experts=experts,
        peak_rss_bytes=peak_rss_bytes(),
        graph_bytes=sum(int(f["bytes"]) for rel, f in engine.manifest.files.items() if rel.startswith("graphs/")),
        embed_ms_per_token=by_kind["prelude"], head_ms_per_token=by_kind["head"],
        trial_prefill_tokens_per_s=[prompt_tokens / r.ttft_s for r in runs],
        trial_decode_tokens_per_s=[len(r.step_s) / sum(r.step_s) for r in runs if r.step_s],
        one_graph=not engine.traces_layers)


def _summary(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "mean": float(ms.mean())}


def _mean_graph_ms(runs: list[_Trial], attr: str, divisor: int) -> dict[str, float]:
    total: dict[str, float] = {}
    for run in runs:
        for name, seconds in getattr(run, attr).items():
            total[name] = total.get(name, 0.0) + seconds * 1e3
    return {name: ms / divisor for name, ms in total.items()}


def _graph_rows(engine, prefill: dict[str, float], decode: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for graph in engine.manifest.data["graphs"]:
        name = graph["name"]
        if name in prefill or name in decode:
            rows.append({"name": name, "kind": graph["kind"], "layer": graph.get("layer"),
                         "prefill_ms": round(prefill.get(name, 0.0), 4),
                         "decode_ms_per_token": round(decode.get(name, 0.0), 4)})
    return rows


def _layer_rows(graphs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Partitioned bundles: a layer's trunk graph plus its expert partitions."""
    layers: dict[int, dict[str, Any]] = {}
    for row in graphs:
        if row["layer"] is None:
            continue
        entry = layers.setdefault(row["layer"], {"layer": row["layer"], "decode_ms_per_token": 0.0,
                                                 "experts_ms_per_token": 0.0, "prefill_ms": 0.0})
        entry["decode_ms_per_token"] += row["decode_ms_per_token"]
        entry["prefill_ms"] += row["prefill_ms"]
        if row["kind"] in EXPERT_ROLES:
            entry["experts_ms_per_token"] += row["decode_ms_per_token"]
    return [layers[i] for i in sorted(layers)]


def _op_profile(bundle, engine, prompt: list[int], gen_tokens: int, target, budget) -> tuple[list, list, dict]:
    """One trial under onnxruntime's node profiler: time per operator type, per layer, and before/after the
    layers (embedding; final norm + LM head)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dsedge-profile-") as tmp:
        profiled = load_bundle(bundle, target=target, memory_budget_bytes=budget, threads=engine.session_config.threads,
                               providers=list(engine.session_config.providers), profile_dir=tmp,
                               compose=not engine.traces_layers)
        _run_trial(profiled, prompt, gen_tokens)
        files = [s.end_profiling() for s in _sessions(profiled)]
        events = [e for f in files if f for e in json.loads(Path(f).read_text())]
    return _aggregate_ops(events, gen_tokens)


def _sessions(engine) -> list:
    found = [getattr(engine, "decoder", None), getattr(engine, "prelude", None), getattr(engine, "head", None)]
    found += list(getattr(engine, "layer_sessions", [])) + list(getattr(engine, "fused", {}).values())
    if getattr(engine, "experts", None) is not None:
        found += list(engine.experts.loaded.values())
    return [s for s in found if s is not None]


def _aggregate_ops(events: list[dict], gen_tokens: int) -> tuple[list, list, dict]:
    by_op: dict[str, float] = {}
    by_layer: dict[int, float] = {}
    outside: list[tuple[int, float]] = []  # (node number, ms) of nodes outside every layer
    last_layer_node = -1
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        ms = event.get("dur", 0) / 1e3 / gen_tokens  # the whole trial per generated token
        op = event.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + ms
        name = event["name"].removesuffix("_kernel_time")
        number = _node_number(name)
        if name.startswith("layers.") and "/" in name:
            layer = int(name.split("/")[0].split(".")[1])
            by_layer[layer] = by_layer.get(layer, 0.0) + ms
            last_layer_node = max(last_layer_node, number)
        else:
            outside.append((number, ms))
    total = sum(by_op.values()) or 1.0
    ops = sorted(({"op": k, "ms_per_token": round(v, 4), "share": round(v / total, 4)} for k, v in by_op.items()),
                 key=lambda r: -r["ms_per_token"])
    layers = [{"layer": i, "ms_per_token": round(by_layer[i], 4)} for i in sorted(by_layer)]
    # Nodes are numbered in build order (GraphBuilder): after the last layer's come the final norm and LM head.
    head = sum(ms for n, ms in outside if n > last_layer_node) if by_layer else None
    embed = sum(ms for n, ms in outside if n <= last_layer_node) if by_layer else None
    return ops, layers, {"embed": embed, "head": head}


def _node_number(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# --- sweeps (llama-bench style) ---------------------------------------------------------------------

@dataclass
class SweepRow:
    threads: int | None
    test: str  # "pp512": prefill of 512 tokens; "tg128": 128 decoded tokens (after a pp prompt, see ``prompt``)
    tokens_per_s: float
    stddev: float  # over the trials
    prompt_tokens: int
    gen_tokens: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SweepReport:
    bundle: str
    trials: int
    rows: list[SweepRow]

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "trials": self.trials, "results": [r.to_json() for r in self.rows]}

    def markdown(self) -> str:
        """The table as llama-bench prints it: ``| threads | test | t/s |`` with ± stddev."""
        lines = ["| threads | test | t/s |", "| ------: | ---: | ---: |"]
        lines += [f"| {r.threads or 'default'} | {r.test} | {r.tokens_per_s:,.2f} ± {r.stddev:,.2f} |"
                  for r in self.rows]
        return "\n".join(lines)


def sweep(open_engine, *, threads: list[int | None], prompt_tokens: list[int], gen_tokens: list[int],
          trials: int = 3, seed: int = 0) -> SweepReport:
    """Profile every (threads, prompt length, generated length) combination: a pp row per prompt length and
    a tg row per generated length (labelled ``tgN @ ppM`` when several prompt lengths make its context differ).

    ``open_engine(threads)`` loads the bundle with that many intra-op threads (one engine per thread count).
    """
    rows: list[SweepRow] = []
    bundle = ""
    for count in threads:
        engine = open_engine(count)
        bundle = str(engine.manifest.root)
        for p in prompt_tokens:
            for i, n in enumerate(gen_tokens):
                r = profile_engine(engine, prompt_tokens=p, gen_tokens=n, trials=trials, seed=seed)
                used = r.threads if count is None else count
                if i == 0:
                    rows.append(_row(used, f"pp{p}", r.trial_prefill_tokens_per_s, p, n))
                if r.trial_decode_tokens_per_s:  # -n 1: the only token comes from the prefill, no decode step
                    label = f"tg{n}" if len(prompt_tokens) == 1 else f"tg{n} @ pp{p}"
                    rows.append(_row(used, label, r.trial_decode_tokens_per_s, p, n))
        del engine  # one bundle's sessions at a time
    return SweepReport(bundle, trials, rows)


def _row(threads: int | None, test: str, rates: list[float], p: int, n: int) -> SweepRow:
    return SweepRow(threads, test, float(np.mean(rates)), float(np.std(rates)), p, n)
