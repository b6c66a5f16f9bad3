"""Speculative decoding: what a verify step costs, and what MTP / prompt-lookup drafting buys.

Three measurements, each in one run on an idle machine (batch 1, greedy, EOS ignored):

* ``verify``: on ds3bench (int4 and int8 by default, built like decode_bench.py), the median time of one
  forward over 1, 2, 3, 4 new tokens after a ``--context``-token cache, relative to the 1-token step. On a
  bandwidth-bound CPU a 2- or 3-token step should cost little more than a 1-token one; this ratio bounds any
  speedup (speedup ≤ tokens per verify step / relative verify cost).
* ``decode``: decode tokens/s with ``--speculative`` off vs mtp / ngram on a bundle (default: the demo model,
  exported here), over prompts from the demo's held-out text, checking the greedy tokens are identical;
  acceptance per draft position and tokens per verify step.
* ``oracle``: what MTP drafting would buy on ds3bench (the V3 shape, random weights, so no trained module to
  measure acceptance on): ds3bench with an MTP module added (layer 7's block copied, random ``eh_proj``),
  compressed and exported with its draft graph. Every step runs the real draft graph and the 2-token verify;
  the draft is kept with probability ``--acceptance`` (``forced_acceptance``: a cost simulation, the tokens
  are not greedy output). Decode tokens/s against plain decoding, alternated over ``--rounds``.
* ``rag``: the same with ``ngram`` on RAG-shaped prompts (numbered source passages from the held-out text,
  then a question about them, through the chat template): answers that quote their sources.

    .venv/bin/python benchmarks/speculative_bench.py verify [--precisions int4 int8] [--context 256] [--checkpoint C]
    .venv/bin/python benchmarks/speculative_bench.py decode --bundle B --mode mtp|ngram|auto [--draft-tokens 1]
        [--rounds 5]
    .venv/bin/python benchmarks/speculative_bench.py oracle [--precisions int4-g128 int8] [--acceptance 0.59 0.85]
    .venv/bin/python benchmarks/speculative_bench.py rag [--bundle B] [--mode ngram|auto] [--draft-tokens 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import bundle as bench_bundle  # noqa: E402 — sibling script
from export_bench import OUT, checkpoint  # noqa: E402

from dsedge.runtime import load_bundle  # noqa: E402
from dsedge.runtime.chat import prepare_prompt  # noqa: E402
from dsedge.runtime.decode import generate_step, prefill  # noqa: E402
from dsedge.runtime.drafts import MTPDrafter  # noqa: E402
from dsedge.runtime.speculative import Speculation, configure  # noqa: E402

HELDOUT = Path(__file__).parents[1] / "dsedge" / "demo" / "data" / "heldout.txt"


def verify_cost(precisions: list[str], context: int, repeats: int, threads: int | None,
                source: str = "ds3bench") -> dict:
    """ms of a forward over T = 1..4 new tokens after ``context`` cached ones, per precision. ``source``: a bench
    model name (built here) or a checkpoint directory (a tiny one smoke-tests the script)."""
    ckpt = Path(source) if Path(source).is_dir() else checkpoint(source)
    results = {}
    for precision in precisions:
        engine = load_bundle(bench_bundle(ckpt, precision), threads=threads)
        prompt = [int(t) for t in np.random.default_rng(0).integers(0, int(engine.spec["vocab_size"]), context)]
        state, _ = prefill(engine, [prompt], room=8)
        ms = {}
        for width in (1, 2, 3, 4):
            times = []
            for _ in range(repeats + 2):  # two warm-ups
                started = time.perf_counter()
                state.forward(np.asarray([prompt[:width]]))
                times.append(time.perf_counter() - started)
                state.truncate(context)
            ms[width] = float(np.median(times[2:]) * 1e3)
        results[precision] = {"ms": ms, "relative": {w: ms[w] / ms[1] for w in ms}}
        print(f"{ckpt.name} {precision}: " + ", ".join(f"{w} tokens {ms[w]:.2f} ms ({ms[w] / ms[1]:.2f}x)"
                                                     for w in ms), file=sys.stderr)
    return results


def heldout_prompts(engine, count: int, tokens: int) -> list[list[int]]:
    text = HELDOUT.read_text(encoding="utf-8")
    step = max(1, len(text) // (count + 1))
    codec = engine.codec
    return [codec.encode(text[i * step: i * step + 8 * tokens])[:tokens] for i in range(count)]


def rag_prompts(engine, count: int, passages: int = 3) -> list[list[int]]:
    paragraphs = [p.strip() for p in HELDOUT.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200]
    prompts = []
    for i in range(count):
        chosen = paragraphs[i * passages: (i + 1) * passages]
        sources = "\n\n".join(f"[{j + 1}] {p[:600]}" for j, p in enumerate(chosen))
        question = f"Sources:\n{sources}\n\nUsing the sources, explain what [1] says, quoting it."
        prompts.append(prepare_prompt(engine, [{"role": "user", "content": question}]).token_ids)
    return prompts


def decode_rate(engine, prompts: list[list[int]], gen: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of every prompt (as many new ones as the bundle's context leaves room for, up to ``gen``)
    and the decode tokens/s over them, the first token (the prefill's) left out."""
    tokens, seconds, count = [], 0.0, 0
    for prompt in prompts:
        events = list(generate_step(engine, prompt, max_new_tokens=min(gen, engine.max_context - len(prompt))))
        tokens.append([e.token_id for e in events])
        seconds += sum(e.step_s for e in events[1:])
        count += len(events) - 1
    return tokens, count / seconds


def decode_compare(engine, prompts: list[list[int]], mode: str, draft_tokens: int | None, gen: int,
                   rounds: int = 1) -> dict:
    """Decode tokens/s off vs ``mode`` over ``prompts``, greedy identity. Each of ``rounds`` runs every prompt
    off, then with ``mode`` (after one warm-up each way), so the two share the machine's drift; the speedup
    is the median of the rounds' ratios."""
    speculation = configure(engine, mode, draft_tokens)  # built once: an MTP drafter opens its own session
    settings = {"off": None, mode: speculation}
    for chosen in settings.values():
        engine.speculation = chosen
        list(generate_step(engine, prompts[0], max_new_tokens=8))  # warm-up
    speculation.stats.reset()
    runs = {setting: {"tokens": None, "tokens_per_s": []} for setting in settings}
    for _ in range(rounds):
        for setting, chosen in settings.items():
            engine.speculation = chosen
            tokens, rate = decode_rate(engine, prompts, gen)
            runs[setting]["tokens_per_s"].append(rate)
            same = runs[setting]["tokens"] in (None, tokens)
            runs[setting]["tokens"] = tokens if same else "differs between rounds"
    configure(engine, "off")
    on, off = runs[mode], runs["off"]
    ratios = [a / b for a, b in zip(on["tokens_per_s"], off["tokens_per_s"], strict=True)]
    result = {"mode": mode, "draft_tokens": draft_tokens, "rounds": rounds,
              "off_tokens_per_s": float(np.median(off["tokens_per_s"])),
              "tokens_per_s": float(np.median(on["tokens_per_s"])), "speedup": float(np.median(ratios)),
              "speedup_by_round": [round(r, 3) for r in ratios],
              "same_tokens": isinstance(off["tokens"], list) and on["tokens"] == off["tokens"],
              **speculation.stats.to_json()}
    print(f"{mode}: {result['tokens_per_s']:.1f} vs {result['off_tokens_per_s']:.1f} tokens/s off "
          f"(median speedup {result['speedup']:.2f}x, rounds {result['speedup_by_round']}), "
          f"{result['tokens_per_verify_step']:.2f} tokens/verify, acceptance by "
          f"position {[round(a, 3) for a in result['acceptance_by_position']]}, same tokens: "
          f"{result['same_tokens']}", file=sys.stderr)
    return result


def mtp_checkpoint(base: Path) -> Path:
    """``base`` (a bench checkpoint, one bf16 file) with a DeepSeek-V3 MTP module at layer L: the last layer's
    block copied (random weights, the shapes of a real MoE layer), ``eh_proj`` random, the norms ones."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = OUT / f"{base.name}-mtp"
    if (out / "config.json").exists():
        return out
    config = json.loads((base / "config.json").read_text())
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    tensors = load_file(str(base / "model.safetensors"))
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    for name in [n for n in tensors if n.startswith(last)]:
        tensors[mtp + name.removeprefix(last)] = tensors[name].clone()
    dtype = tensors["model.embed_tokens.weight"].dtype
    generator = torch.Generator().manual_seed(0)
    tensors[mtp + "eh_proj.weight"] = (torch.randn(width, 2 * width, generator=generator) * 0.02).to(dtype)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{mtp}{norm}.weight"] = torch.ones(width, dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("model*.safetensors*"))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2) + "\n")
    tmp.rename(out)
    return out


def forced_acceptance(acceptance: float, seed: int = 0):
    """An ``accept_draft`` that keeps the (single) draft with probability ``acceptance`` whatever it is, and
    otherwise rejects it: the work of every step is real (the draft graph, the 2-token verify, the cache
    roll-back), the tokens are not the model's greedy output. For cost only: on a random-weight model the
    module's own acceptance says nothing, and greedy near-ties (flat random logits) make a plain-greedy
    oracle drift off the verified text."""
    rng = np.random.default_rng(seed)

    def accept(draft, rows, sampler, history):
        if draft.tokens and rng.random() < acceptance:
            return [draft.tokens[0], sampler(rows[1], [*history, draft.tokens[0]])]
        return [sampler(rows[0], history)]

    return accept


def oracle_compare(engine, prompts: list[list[int]], acceptances: list[float], gen: int, rounds: int) -> dict:
    """Decode tokens/s of plain decoding and of MTP drafting at each forced acceptance, alternated per round."""
    import dsedge.runtime.speculative as speculative

    real_accept = speculative.accept_draft
    settings = {"off": None, **{a: Speculation(MTPDrafter(engine), 1) for a in acceptances}}
    # one stream of draws per acceptance for the whole run: seeded afresh each round, every round would repeat
    # the same few hundred draws, and their share (not the asked rate) would be the acceptance measured
    accepts = {a: forced_acceptance(a, seed=i) for i, a in enumerate(acceptances)}
    speeds = {name: [] for name in settings}
    try:
        for _ in range(rounds):
            for name, speculation in settings.items():
                engine.speculation = speculation
                speculative.accept_draft = real_accept if speculation is None else accepts[name]
                list(generate_step(engine, prompts[0], max_new_tokens=8))  # warm-up
                speeds[name].append(decode_rate(engine, prompts, gen)[1])
    finally:
        speculative.accept_draft, engine.speculation = real_accept, None
    off = np.asarray(speeds["off"])
    result = {"off_tokens_per_s": float(np.median(off))}
    for a in acceptances:
        ratios = np.asarray(speeds[a]) / off
        stats = settings[a].stats.to_json()
        result[str(a)] = {"tokens_per_s": float(np.median(speeds[a])), "speedup": float(np.median(ratios)),
                          "speedup_by_round": [round(float(r), 3) for r in ratios],
                          "acceptance_measured": stats["acceptance"],
                          "tokens_per_verify_step": stats["tokens_per_verify_step"]}
        print(f"acceptance {a}: {result[str(a)]['tokens_per_s']:.1f} vs {result['off_tokens_per_s']:.1f} tokens/s "
              f"off, median speedup {result[str(a)]['speedup']:.2f}x (rounds {result[str(a)]['speedup_by_round']}),"
              f" measured acceptance {stats['acceptance']:.3f}", file=sys.stderr)
    return result


def demo_bundle() -> Path:
    from dsedge.export.bundle import export_bundle

    out = OUT / "deepseek-v3-tiny.bundle"
    if not (out / "manifest.json").exists():
        export_bundle("deepseek-v3-tiny", out, max_context=1024, overwrite=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["verify", "decode", "oracle", "rag"])
    parser.add_argument("--bundle", help="bundle to decode with (default: the demo model, exported here)")
    parser.add_argument("--mode", choices=["mtp", "ngram", "auto"], help="decode: default mtp; rag: default ngram")
    parser.add_argument("--draft-tokens", type=int)
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.59, 0.85],
                        help="oracle: acceptance rates to simulate (0.59: the demo module; 0.85: DeepSeek's report)")
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"])
    parser.add_argument("--checkpoint", default="ds3bench", help="verify: bench model name or checkpoint dir")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="decode/rag: off and on alternated this many times")
    parser.add_argument("-t", "--threads", type=int)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.what == "verify":
        result = verify_cost(args.precisions, args.context, args.repeats, args.threads, args.checkpoint)
    elif args.what == "oracle":
        ckpt = mtp_checkpoint(checkpoint(args.checkpoint))
        result = {}
        for precision in args.precisions:
            engine = load_bundle(bench_bundle(ckpt, precision), threads=args.threads)
            print(f"{ckpt.name} {precision}:", file=sys.stderr)
            result[precision] = oracle_compare(engine, heldout_prompts(engine, args.prompts, args.prompt_tokens),
                                               args.acceptance, args.gen, args.rounds)
    else:
        engine = load_bundle(args.bundle or demo_bundle(), threads=args.threads)
        if args.what == "rag":
            result = decode_compare(engine, rag_prompts(engine, args.prompts), args.mode or "ngram", args.draft_tokens,
                                    args.gen, args.rounds)
        else:
            prompts = heldout_prompts(engine, args.prompts, args.prompt_tokens)
            result = decode_compare(engine, prompts, args.mode or "mtp", args.draft_tokens, args.gen, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
