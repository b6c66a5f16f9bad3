"""`dsedge serve` under load: aggregate tokens/s and p50/p99 time to first token at 1, 4 and 8 concurrent
clients, and TTFT of turn 10 vs turn 1 of one conversation with and without the prompt cache.

Models: a BUNDLE, or ``--models qwen2bench ds3bench`` at ``--precision int4`` (the bench checkpoints, compressed
and exported as ``decode_bench.py`` does, once, into benchmarks/out), or without either the shipped demo model.
The server runs in-process on 127.0.0.1 (a free port) with ``--parallel`` equal to the client count of each
level, so N streams advance together; clients are threads driving the official ``openai`` client with
streamed, greedy chat requests of ``--max-tokens`` each (a random-weight model rarely stops early; the tokens
counted are the usage's). TTFT is measured at the client: request sent → first chunk with text (answer or
reasoning). A warm-up request runs before each level.

MoE bundles (partitioned layout: the runtime sees each layer's routing): for every batched decode step (B
rows, one token each) the distinct routed experts the step touched, summed over layers, next to one row's
(the mean over its rows), and the same in expert bytes (each expert's share of its partition) and in
partition bytes (what the partitioned engine reads: every partition holding a chosen expert). Their ratio
is the bandwidth bound of the batched speedup: a step over B rows reads that many times one row's expert
weights, so with memory-bound experts aggregate decode can gain at most B / ratio over B single streams. The
independent-routing value E·(1 − (1 − k/E)^B) / k is printed beside it (random weights route nearly so:
4 rows at 32 experts top-4 touch ~3.3× one row's experts). Counted, not timed.

The conversation sends the same user message every turn (so every turn's new part has the same length),
keeps each answer in the history, and runs twice on one engine: through a server with the prompt cache and
through one without (``--prompt-cache 0``). Goal (issue 14): turn 10's TTFT within 1.2× of turn 1's with the
cache; without it, turn 10 prefills the whole history.

    .venv/bin/python benchmarks/serve_bench.py [BUNDLE | --models qwen2bench ds3bench] [--precision int4]
        [--clients 1 4 8] [--requests 16] [--max-tokens 64] [--turns 10] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
QUESTIONS = ["What does the json module do?", "How do I read a file line by line?", "What is a generator?",
             "Explain list comprehensions.", "What is the difference between a list and a tuple?",
             "How do I sort a dictionary by value?", "What does the with statement do?", "What is a decorator?"]
SYSTEM = "You are a helpful assistant. Answer the user's questions about Python clearly and briefly."
TURN_MESSAGE = "Tell me more about that, please."
BENCH_MODELS = ("qwen2bench", "ds3bench")


def demo_bundle() -> Path:
    """The demo model as a monolithic bundle (exported once)."""
    from dsedge.demo import model_path
    from dsedge.export.bundle import export_bundle

    out = OUT / "serve-demo.bundle"
    if not (out / "manifest.json").exists():
        export_bundle(model_path("deepseek-v3-tiny"), out, overwrite=True)
    return out


def bench_bundle(name: str, precision: str) -> Path:
    """A bench model at ``precision``, built as decode_bench.py builds it (and shared with it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_bench import bundle  # sibling script: the same compress/export recipe
    from export_bench import checkpoint

    return bundle(checkpoint(name), precision)


def streamed_chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy request: TTFT (first text), total seconds, completion tokens, cached prompt tokens,
    and the answer."""
    started = time.perf_counter()
    ttft, parts, tokens, cached = None, [], 0, 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else 0
        for choice in chunk.choices:
            text = (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
            if text and ttft is None:
                ttft = time.perf_counter() - started
            parts.append(choice.delta.content or "")
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - started,
            "total_s": time.perf_counter() - started, "tokens": tokens, "cached_tokens": cached,
            "answer": "".join(parts)}


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)


class ExpertTally:
    """Routed-expert traffic of each batched decode step of a partitioned MoE engine.

    Observes, never changes: ``engine.forward`` notes each pass's [B, T]; the engine's per-layer routing report
    (``_touched``, handed the layer's ``expert_ids`` [B·T, top_k], on the composed graph and graph by graph alike)
    notes which experts each row chose. A pass with T = 1 and B > 1 is a batched decode step."""

    def __init__(self, engine):
        self.engine, self.steps = engine, []
        self._shape, self._layers = None, []
        self._forward, self._touched = engine.forward, engine._touched
        engine.forward, engine._touched = self._observed_forward, self._observed_touched

    @staticmethod
    def applies(engine) -> bool:
        """Whether the engine routes rows to expert partitions (a partitioned MoE bundle)."""
        return hasattr(engine, "_touched") and bool(getattr(engine, "partitions_by_layer", None))

    def close(self) -> None:
        self.engine.forward, self.engine._touched = self._forward, self._touched

    def _observed_forward(self, ids, mask, cache, **options):
        self._shape, self._layers = ids.shape, []
        try:
            return self._forward(ids, mask, cache, **options)
        finally:
            rows, width = self._shape
            if width == 1 and rows > 1 and self._layers:
                self.steps.append(step_traffic(self._layers, rows))

    def _observed_touched(self, layer, expert_ids):
        self._layers.append((np.asarray(expert_ids).reshape(self._shape[0], -1),
                             self.engine.partitions_by_layer.get(layer, [])))
        return self._touched(layer, expert_ids)

    def summary(self) -> dict | None:
        """Mean traffic ratios per batch size over the steps seen (None: no batched step)."""
        if not self.steps:
            return None
        out = {}
        for rows in sorted({s["rows"] for s in self.steps}):
            steps = [s for s in self.steps if s["rows"] == rows]
            mean = {key: float(np.mean([s[key] for s in steps])) for key in steps[0] if key != "rows"}
            out[str(rows)] = {"steps": len(steps), **{k: round(v, 3) for k, v in mean.items()},
                              "experts_ratio": round(mean["experts"] / mean["experts_one_row"], 3),
                              "expert_bytes_ratio": round(mean["expert_bytes"] / mean["expert_bytes_one_row"], 3),
                              "partition_bytes_ratio": round(mean["partition_bytes"]
                                                             / mean["partition_bytes_one_row"], 3),
                              "independent_routing_ratio": round(independent_ratio(steps[0], rows), 3)}
        return out


def step_traffic(layers: list[tuple[np.ndarray, list]], rows: int) -> dict:
    """One batched decode step's expert traffic, summed over MoE layers: for all rows together and for one
    row (the mean over rows). ``layers``: per layer, the experts each row chose [rows, top_k] and the layer's
    partitions (``experts`` [first, last), ``bytes``)."""
    totals = dict.fromkeys(("experts", "expert_bytes", "partition_bytes"), 0.0)
    one = dict.fromkeys(totals, 0.0)
    top_k = experts_per_layer = 0
    for chosen, partitions in layers:
        top_k, experts_per_layer = chosen.shape[1], sum(p.experts[1] - p.experts[0] for p in partitions)
        for key, value in _traffic(np.unique(chosen), partitions).items():
            totals[key] += value
        for row in chosen:
            for key, value in _traffic(np.unique(row), partitions).items():
                one[key] += value / rows
    return {"rows": rows, **totals, **{f"{k}_one_row": v for k, v in one.items()}, "top_k": top_k,
            "experts_per_layer": experts_per_layer}


def _traffic(experts: np.ndarray, partitions: list) -> dict:
    """Distinct experts, their bytes (each its share of its partition) and the bytes of the partitions they
    fall in."""
    expert_bytes = partition_bytes = 0.0
    for p in partitions:
        inside = int(np.count_nonzero((experts >= p.experts[0]) & (experts < p.experts[1])))
        expert_bytes += p.bytes * inside / (p.experts[1] - p.experts[0])
        partition_bytes += p.bytes if inside else 0
    return {"experts": float(len(experts)), "expert_bytes": expert_bytes, "partition_bytes": partition_bytes}


def independent_ratio(step: dict, rows: int) -> float:
    """E·(1 − (1 − k/E)^B) / k: distinct experts of B rows routed independently and uniformly, over one row's."""
    experts, k = step["experts_per_layer"], step["top_k"]
    return experts * (1 - (1 - k / experts) ** rows) / k if experts and k else float("nan")


def concurrency_level(url: str, model: str, clients: int, requests: int, max_tokens: int, engine=None) -> dict:
    """``requests`` chats spread over ``clients`` threads: aggregate tokens/s, p50/p99 TTFT; with a partitioned
    MoE ``engine``, the expert traffic of its batched decode steps (``ExpertTally``)."""
    client = _client(url)
    streamed_chat(client, model, [{"role": "user", "content": "warm-up"}], 4)
    jobs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(requests)]
    tally = ExpertTally(engine) if engine is not None and ExpertTally.applies(engine) else None
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda m: streamed_chat(client, model, m, max_tokens), jobs))
    finally:
        if tally is not None:
            tally.close()
    wall = time.perf_counter() - started
    ttfts = np.array([r["ttft_s"] for r in results]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    level = {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
             "tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": round(float(np.percentile(ttfts, 50)), 2),
             "ttft_p99_ms": round(float(np.percentile(ttfts, 99)), 2)}
    if tally is not None:
        level["expert_traffic"] = tally.summary()
    return level


def print_traffic(traffic: dict | None) -> None:
    for rows, t in (traffic or {}).items():
        print(f"      {rows} rows/step ({t['steps']} steps): routed experts {t['experts']:.1f} vs one row's "
              f"{t['experts_one_row']:.1f} = {t['experts_ratio']:.2f}x (independent routing "
              f"{t['independent_routing_ratio']:.2f}x); expert bytes/step {t['expert_bytes_ratio']:.2f}x, "
              f"partition bytes/step {t['partition_bytes_ratio']:.2f}x one row's")


def conversation(url: str, model: str, turns: int, max_tokens: int) -> dict:
    """TTFT of each turn of one conversation (the same new message each turn; every answer kept)."""
    client = _client(url)
    streamed_chat(client, model, [{"role": "user", "content": "warm-up"}], 4)
    messages, ttfts, cached = [{"role": "system", "content": SYSTEM}], [], []
    for _ in range(turns):
        messages.append({"role": "user", "content": TURN_MESSAGE})
        result = streamed_chat(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["answer"]})
        ttfts.append(round(result["ttft_s"] * 1e3, 2))
        cached.append(result["cached_tokens"])
    return {"turns": turns, "ttft_ms": ttfts, "cached_tokens": cached,
            "last_over_first": round(ttfts[-1] / ttfts[0], 2)}


def run(bundle: Path, levels: list[int], requests: int, max_tokens: int, turns: int, threads: int | None) -> dict:
    from dsedge.runtime import load_bundle
    from dsedge.serve import Backend, background, create_app

    engine = load_bundle(bundle, threads=threads)
    backend = Backend(engine, bundle.resolve().name)
    result = {"bundle": str(bundle), "model": backend.model_id, "max_tokens": max_tokens, "levels": []}
    for clients in levels:
        with background(create_app(backend, parallel=clients)) as url:
            level = concurrency_level(url, backend.model_id, clients, requests, max_tokens, engine)
        result["levels"].append(level)
        print(f"{clients:>3} clients  {level['tokens_per_s']:>9.1f} tokens/s  TTFT p50 {level['ttft_p50_ms']:>8.1f} "
              f"ms  p99 {level['ttft_p99_ms']:>8.1f} ms  ({level['requests']} requests, {level['tokens']} tokens)")
        print_traffic(level.get("expert_traffic"))
    if len(result["levels"]) > 1:
        one = result["levels"][0]["tokens_per_s"]
        for level in result["levels"]:
            level["speedup_vs_first"] = round(level["tokens_per_s"] / one, 2) if one else None
    for label, cache_bytes in (("with_prompt_cache", None), ("without_prompt_cache", 0)):
        talk_backend = (Backend(engine, backend.model_id) if cache_bytes is None
                        else Backend(engine, backend.model_id, prompt_cache_bytes=cache_bytes))
        with background(create_app(talk_backend)) as url:
            talk = result[label] = conversation(url, backend.model_id, turns, max_tokens)
        print(f"conversation {label.replace('_', ' ')}: TTFT turn 1 {talk['ttft_ms'][0]:.1f} ms, turn {turns} "
              f"{talk['ttft_ms'][-1]:.1f} ms (x{talk['last_over_first']}; cached tokens {talk['cached_tokens']})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (default: --models, else the demo)")
    parser.add_argument("--models", nargs="+", choices=BENCH_MODELS, help="bench models to build and serve")
    parser.add_argument("--precision", default="int4", choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--turns", type=int, default=10, help="turns of the conversation")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the bundle's target)")
    parser.add_argument("--json", type=Path, default=OUT / "serve_bench.json")
    args = parser.parse_args()
    if args.turns < 1 or args.requests < 1 or args.max_tokens < 1 or min(args.clients) < 1:
        sys.exit("--turns, --requests, --max-tokens and --clients must be ≥ 1")
    if args.bundle and args.models:
        sys.exit("pass a BUNDLE or --models, not both")
    bundles = ([bench_bundle(name, args.precision) for name in args.models] if args.models
               else [args.bundle or demo_bundle()])
    results = []
    for bundle in bundles:
        print(f"== {bundle.name}")
        results.append(run(bundle, args.clients, args.requests, args.max_tokens, args.turns, args.threads))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
