"""`dsedge serve` under load: aggregate tokens/s and time to first token at 1, 4 and 8 concurrent clients, and
TTFT of turn 10 vs turn 1 of one conversation (the prompt grows each turn; with no prompt cache yet, every turn
prefills the whole history).

The server runs in-process on 127.0.0.1 (a free port) with ``--parallel`` equal to the client count of each
level, so N streams advance together; clients are threads driving the official ``openai`` client with streamed,
greedy chat requests. TTFT is measured at the client: request sent → first chunk with text. A warm-up request
runs before each level.

    .venv/bin/python benchmarks/serve_bench.py BUNDLE [--clients 1 4 8] [--requests 16] [--max-tokens 64]
                                                      [--turns 10] [--json out.json]
    (without BUNDLE: the shipped demo model, exported once to benchmarks/out/serve-demo.bundle)
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


def demo_bundle() -> Path:
    """The demo model as a monolithic bundle (exported once)."""
    from dsedge.demo import model_path
    from dsedge.export.bundle import export_bundle

    out = OUT / "serve-demo.bundle"
    if not (out / "manifest.json").exists():
        export_bundle(model_path("deepseek-v3-tiny"), out, overwrite=True)
    return out


def streamed_chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy request: TTFT (first text), total seconds, completion tokens, and the answer."""
    started = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text = (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
            if text and ttft is None:
                ttft = time.perf_counter() - started
            parts.append(choice.delta.content or "")
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - started,
            "total_s": time.perf_counter() - started, "tokens": tokens, "answer": "".join(parts)}


def concurrency_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``requests`` chats spread over ``clients`` threads: aggregate tokens/s, p50/p99 TTFT."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    streamed_chat(client, model, [{"role": "user", "content": "warm-up"}], 4)
    jobs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: streamed_chat(client, model, m, max_tokens), jobs))
    wall = time.perf_counter() - started
    ttfts = np.array([r["ttft_s"] for r in results]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": round(float(np.percentile(ttfts, 50)), 2),
            "ttft_p99_ms": round(float(np.percentile(ttfts, 99)), 2)}


def conversation(url: str, model: str, turns: int, max_tokens: int) -> dict:
    """TTFT of each turn of one conversation whose history keeps every answer."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    messages, ttfts = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        result = streamed_chat(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["answer"]})
        ttfts.append(round(result["ttft_s"] * 1e3, 2))
    return {"turns": turns, "ttft_ms": ttfts, "last_over_first": round(ttfts[-1] / ttfts[0], 2)}


def run(bundle: Path, levels: list[int], requests: int, max_tokens: int, turns: int) -> dict:
    from dsedge.serve import Backend, background, create_app

    backend = Backend.open(bundle)
    result = {"bundle": str(bundle), "model": backend.model_id, "max_tokens": max_tokens, "levels": []}
    for clients in levels:
        with background(create_app(backend, parallel=clients)) as url:
            level = concurrency_level(url, backend.model_id, clients, requests, max_tokens)
        result["levels"].append(level)
        print(f"{clients:>3} clients  {level['tokens_per_s']:>9.1f} tokens/s  TTFT p50 {level['ttft_p50_ms']:>8.1f} "
              f"ms  p99 {level['ttft_p99_ms']:>8.1f} ms  ({level['requests']} requests, {level['tokens']} tokens)")
    with background(create_app(backend)) as url:
        result["conversation"] = conversation(url, backend.model_id, turns, max_tokens)
    talk = result["conversation"]
    print(f"conversation: TTFT turn 1 {talk['ttft_ms'][0]:.1f} ms, turn {turns} {talk['ttft_ms'][-1]:.1f} ms "
          f"(x{talk['last_over_first']})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (default: the demo model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--turns", type=int, default=10, help="turns of the conversation")
    parser.add_argument("--json", type=Path, default=OUT / "serve_bench.json")
    args = parser.parse_args()
    if args.turns < 1 or args.requests < 1 or min(args.clients) < 1:
        sys.exit("--turns, --requests and --clients must be ≥ 1")
    result = run(args.bundle or demo_bundle(), args.clients, args.requests, args.max_tokens, args.turns)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
