"""`dsedge profile`: latency and memory of a bundle on this machine (see dsedge.runtime.profile)."""

from __future__ import annotations

import sys


def register(sub, command) -> None:
    from dsedge.cli import add_engine_flags, int_list

    cmd = command(sub, "profile", "measure TTFT, decode speed and where the time goes",
                  "Profile a bundle on this machine: a warm-up, then --trials runs of prefill (--prompt-tokens\n"
                  "seeded random ids) and greedy decode (--gen-tokens, EOS ignored so every trial does the same\n"
                  "work). Reports TTFT, prefill tokens/s, decode ms/token p50/p90 and tokens/s, time per graph\n"
                  "and per layer (partitioned bundles: trunk and expert partitions), the runtime's own overhead\n"
                  "per token, expert-cache hits/misses/load time, peak RSS, providers and threads.\n\n"
                  "Comma lists sweep, as llama-bench does: every (threads, prompt, generated) combination, printed\n"
                  "as a markdown table of pp (prefill) and tg (decode) tokens/s, mean ± stddev over the trials.\n\n"
                  "examples:\n"
                  "  dsedge profile demo.bundle\n"
                  "  dsedge profile v2lite.bundle --target x86-cpu-16g -p 512 -n 128 --json\n"
                  "  dsedge profile demo.bundle --by-op --plot profile.png\n"
                  "  dsedge profile demo.bundle -p 128,512 -n 128 --threads 1,2      a sweep: one table row per test",
                  _run, _render)
    from dsedge.cli import BUNDLE_HELP

    cmd.add_argument("bundle", help=BUNDLE_HELP)
    cmd.add_argument("-p", "--prompt-tokens", type=int_list, default=[128], metavar="N[,N...]",
                     help="prompt length, or a comma list to sweep (default 128)")
    cmd.add_argument("-n", "--gen-tokens", type=int_list, default=[64], metavar="N[,N...]",
                     help="tokens generated per trial, or a comma list to sweep (default 64)")
    cmd.add_argument("-r", "--trials", type=int, default=3, metavar="N",
                     help="timed trials after the warm-up (default 3)")
    add_engine_flags(cmd, threads_list=True)
    cmd.add_argument("--by-op", action="store_true",
                     help="one more trial under onnxruntime's node profiler: time per operator type and per layer")
    cmd.add_argument("--plot", metavar="FILE.png", help="write a PNG: decode step breakdown and time per layer")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    cmd.add_argument("--index", metavar="INDEX",
                     help="also time retrieval (embed, search, prompt assembly) and its share of time to first token; "
                          "a bundle exported with --index is timed with its own index")
    cmd.add_argument("--question", default=None, help="the question retrieval is timed with")


def _run(args):
    from dsedge.cli import default_target
    from dsedge.rag import open_retriever
    from dsedge.runtime import load_bundle
    from dsedge.runtime.profile import profile_engine
    from dsedge.runtime.speculative import configure
    from dsedge.store import resolve_bundle

    args.bundle = str(resolve_bundle(args.bundle))
    args.target = args.target or default_target(args.bundle)  # the export target, else this machine (auto)

    threads = args.threads or [None]
    # a sweep over thread counts keeps per-session pools: the process-wide one is sized once, by the first
    shared = False if len(threads) > 1 else None

    def open_engine(count: int | None):
        engine = load_bundle(args.bundle, target=args.target, threads=count, memory_budget_bytes=args.memory_budget,
                             prefetch_experts=args.prefetch_experts, verify="full" if args.verify else True,
                             shared_threads=shared, compose=not args.graph_by_graph)
        configure(engine, args.speculative, args.draft_tokens)
        return engine

    if max(len(threads), len(args.prompt_tokens), len(args.gen_tokens)) > 1:
        return _sweep(args, open_engine, threads)
    engine = open_engine(threads[0])
    return profile_engine(engine, prompt_tokens=args.prompt_tokens[0], gen_tokens=args.gen_tokens[0],
                          trials=args.trials,
                          by_op=args.by_op, seed=args.seed, plot=args.plot, target=args.target,
                          memory_budget_bytes=args.memory_budget, retriever=open_retriever(engine, args.index),
                          **({"question": args.question} if args.question else {}))


def _sweep(args, open_engine, threads: list[int | None]):
    from dsedge.errors import UsageError
    from dsedge.runtime.profile import sweep

    single = [flag for flag, given in (("--by-op", args.by_op), ("--plot", args.plot), ("--index", args.index))
              if given]
    if single:
        raise UsageError(f"{', '.join(single)} profile one configuration, not a sweep", where=single[0],
                         hint="give -p, -n and --threads one value each, or drop " + ", ".join(single))
    return sweep(open_engine, threads=threads, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                 trials=args.trials, seed=args.seed)


def _render(r) -> None:
    print(r.markdown() if hasattr(r, "markdown") else render_profile(r))


def render_profile(r) -> str:
    mib, d = 1024 * 1024, r.decode_ms_per_token
    layout = f"{r.layout}, composed into one graph" if r.layout == "partitioned" and r.one_graph else r.layout
    lines = [f"{r.bundle} ({layout}) on {', '.join(r.providers)}, threads {r.threads or 'default'}; "
             f"{r.trials} trials of {r.prompt_tokens} prompt + {r.gen_tokens} generated tokens",
             f"  TTFT            {r.ttft_ms['p50']:8.1f} ms p50  {r.ttft_ms['p90']:8.1f} ms p90   "
             f"prefill {r.prefill_tokens_per_s:,.0f} tokens/s",
             f"  decode          {d['p50']:8.2f} ms p50  {d['p90']:8.2f} ms p90   "
             f"{r.decode_tokens_per_s:,.1f} tokens/s",
             f"  outside ORT     {r.outside_ort_ms_per_token:8.3f} ms per decoded token (sampling, cache, glue)",
             f"  peak RSS        {r.peak_rss_bytes / mib:8.1f} MiB   graphs + weights {r.graph_bytes / mib:.1f} MiB"]
    if r.experts is not None:
        e = r.experts
        lines.append(f"  expert loads    {r.expert_load_ms_per_token:8.3f} ms per decoded token waiting for "
                     f"partitions ({e['prefetches']} prefetched, {e['prefetch_hits']} of them in time)")
        streamed = f", {e['streamed']} run from the file" if e.get("streamed") else ""
        lines.append(f"  expert cache    hit rate {e['hit_rate']:.1%} ({e['hits']} hits, {e['misses']} misses"
                     f"{streamed}, {e['evictions']} evictions), {e['bytes_loaded'] / mib:.1f} MiB loaded in "
                     f"{e['load_seconds'] * 1e3:.1f} ms")
    lines += _graph_lines(r.graphs)
    if r.ops:
        lines.append("  by operator (decode + prefill, ms per generated token):")
        lines += [f"    {o['op']:<22} {o['ms_per_token']:8.3f}  {o['share']:6.1%}" for o in r.ops[:10]]
    if r.retrieval:
        q = r.retrieval
        lines.append(f"  retrieval       embed {q['embed_ms']:.2f} ms + search {q['search_ms']:.3f} ms + assembly "
                     f"{q['assembly_ms']:.2f} ms = {q['share_of_ttft']:.1%} of a {q['ttft_ms']:.1f} ms TTFT "
                     f"({q['sources']} sources, {q['prompt_tokens']}-token prompt)")
    if r.speculative:
        s = r.speculative
        by_position = ", ".join(f"{a:.0%}" for a in s["acceptance_by_position"]) or "nothing drafted"
        lines.append(f"  speculative     {s['mode']} k={s['draft_tokens']}: {s['tokens_per_verify_step']:.2f} tokens "
                     f"per verify step, accepted by position {by_position}; {s['decode_tokens_per_s']:,.1f} vs "
                     f"{s['off_decode_tokens_per_s']:,.1f} tokens/s off ({s['speedup']:.2f}x)"
                     f"{'' if s['same_tokens'] else '  GREEDY OUTPUT DIFFERS'}")
    if r.plot:
        lines.append(f"  plot: {r.plot}")
    return "\n".join(lines)


def _graph_lines(graphs: list[dict]) -> list[str]:
    if not graphs:
        return []
    lines = ["  per graph (ms):                       prefill  decode/token"]
    shown = sorted(graphs, key=lambda g: -g["decode_ms_per_token"])[:12]
    for g in shown:
        lines.append(f"    {g['name']:<34} {g['prefill_ms']:8.2f}  {g['decode_ms_per_token']:8.3f}")
    if len(graphs) > len(shown):
        lines.append(f"    … {len(graphs) - len(shown)} more (see --json)")
    return lines


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `dsedge profile`")
