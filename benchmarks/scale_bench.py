"""Real size (issue 13): random-weight checkpoints with published shapes, through compress → export → run.

Models (configs in ``../shared/configs/``):
- ``r1-distill-qwen-1.5b``: ``DeepSeek-R1-Distill-Qwen-1.5B.json`` (an HF Qwen2 config, used as is).
- ``v2-lite``: ``deepseek-v3-repo-inference-config_16B.json`` in DeepSeek's reference key names (``dim``,
  ``n_layers``, ``moe_inter_dim``…), mapped to an HF ``deepseek_v2`` config by :func:`v2_lite_hf_config`.

Each checkpoint is written in bf16 one layer per shard, one tensor at a time (memory follows one tensor), with
the tiny test tokenizer (random weights: the text is meaningless, the shapes are not). Two phases, state in
``WORK/<model>.state.json`` between them:

- ``prepare`` (untimed): build; convert to GGUF for llama.cpp (``--llamacpp``: bf16 then llama-quantize Q4_0
  / Q8_0, with ``../shared/bench/llamacpp.sh``); per preset (``int4``, and ``int8`` for a dense model)
  compress with RTN and export with validation (partitioned for MoE, monolithic for dense), each in a fresh
  process whose peak RSS (its own ``VmHWM``; ``ru_maxrss`` would carry this driver's) and seconds are
  recorded; plan's size against the bundle's; the bf16 and compressed checkpoints deleted once used (disk).
- ``measure`` (a quiet machine): ``--rounds`` rounds, each with a bandwidth probe and the load average, of
  dsedge with every expert resident, dsedge under a budget keeping 25% of the routed-expert bytes, and
  llama-bench on the same checkpoint at the same bits — decode tokens/s at 16 and 512 cached tokens, prefill
  of 512 (TTFT), load seconds, peak RSS, expert-cache hit rate.

    B="benchmarks/scale_bench.py --work /work/scale --llamacpp"
    nice -n 10 .venv/bin/python $B --model r1-distill-qwen-1.5b --phase prepare
    .venv/bin/python $B --model r1-distill-qwen-1.5b --phase measure --json q.json    # nothing else running
    nice -n 10 .venv/bin/python $B --model v2-lite --layers 8 --phase prepare
    .venv/bin/python $B --model v2-lite --layers 8 --phase measure --json v2.json
    .venv/bin/python benchmarks/scale_bench.py --model v2-lite --smoke   # 2 layers, dims / 16: the code path only

``--layers`` keeps full width and cuts depth (per-layer figures extrapolate; docs/scale.md). Timing numbers
are only meaningful on a quiet machine.

``--model v3-layer``: one full-size DeepSeek-V3 MoE layer (``DeepSeek-V3-Base.json``: hidden 7168, 256 routed
experts + 1 shared, moe_intermediate 2048, q_lora 1536, kv_lora 512), FP8 e4m3 weights with 128×128 block
scales, random values — 11.3B parameters, ≈10.5 GiB on disk (vocab cut to 4096: the layer is what is
measured). Compressed int4-experts with RTN for every module in a fresh process (peak RSS: goal ≤ 8 GiB, must
be ≤ 12 GiB; seconds per layer and per billion parameters), then GPTQ vs RTN timed on ``--gptq-experts``
experts of that layer (all-token Hessian from random MoE inputs: GPTQ's time does not depend on the values).
Disk: the FP8 layer (10.5 GiB) plus its int4 output (≈5.8 GiB); both deleted after.

    nice -n 10 .venv/bin/python benchmarks/scale_bench.py --model v3-layer --work /data/scale --json v3-layer.json
    .venv/bin/python benchmarks/scale_bench.py --model v3-layer --width-div 16   # smoke: widths / 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # sibling scripts: decode_bench (llama.cpp), export_bench
# ../shared/configs beside the checkout (or beside the worktrees' parent); --configs overrides
CONFIGS = next((p for p in (ROOT.parent / "shared" / "configs", ROOT.parents[1] / "shared" / "configs") if p.is_dir()),
               ROOT.parent / "shared" / "configs")
MODELS = {"r1-distill-qwen-1.5b": "DeepSeek-R1-Distill-Qwen-1.5B.json",
          "v2-lite": "deepseek-v3-repo-inference-config_16B.json",
          "v3-layer": "DeepSeek-V3-Base.json"}
V3_LAYER_GOAL_BYTES, V3_LAYER_LIMIT_BYTES = 8 << 30, 12 << 30


def v2_lite_hf_config(ref: dict) -> dict:
    """DeepSeek's reference-inference config (inference/configs/config_16B.json) → HF ``deepseek_v2``.

    Routing of V2-Lite: softmax scores, plain greedy top-k (n_expert_groups 1), no renormalisation, route_scale
    1.0; YaRN as in the published HF config (factor 40 over 4096, mscale 0.707 = ``mscale`` here)."""
    rope = {"type": "yarn", "factor": ref.get("rope_factor", 40), "beta_fast": ref.get("beta_fast", 32),
            "beta_slow": ref.get("beta_slow", 1), "mscale": ref["mscale"], "mscale_all_dim": ref["mscale"],
            "original_max_position_embeddings": ref.get("original_seq_len", 4096)}
    groups = ref.get("n_expert_groups", 1)
    return {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": ref["vocab_size"],
        "hidden_size": ref["dim"], "intermediate_size": ref["inter_dim"], "moe_intermediate_size": ref["moe_inter_dim"],
        "num_hidden_layers": ref["n_layers"], "first_k_dense_replace": ref["n_dense_layers"],
        "num_attention_heads": ref["n_heads"], "num_key_value_heads": ref["n_heads"],
        "n_routed_experts": ref["n_routed_experts"], "n_shared_experts": ref["n_shared_experts"],
        "num_experts_per_tok": ref["n_activated_experts"], "routed_scaling_factor": ref["route_scale"],
        "n_group": groups, "topk_group": ref.get("n_limited_groups", 1),
        "topk_method": "greedy" if groups == 1 else "group_limited_greedy", "scoring_func": "softmax",
        "norm_topk_prob": False, "moe_layer_freq": 1, "q_lora_rank": ref["q_lora_rank"] or None,
        "kv_lora_rank": ref["kv_lora_rank"], "qk_nope_head_dim": ref["qk_nope_head_dim"],
        "qk_rope_head_dim": ref["qk_rope_head_dim"], "v_head_dim": ref["v_head_dim"],
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": rope,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "attention_bias": False,
    }


def hf_config(model: str, layers: int | None, smoke: bool, configs: Path = CONFIGS) -> dict:
    ref = json.loads((configs / MODELS[model]).read_text())
    config = v2_lite_hf_config(ref) if model == "v2-lite" else {**ref, "bos_token_id": 0, "eos_token_id": 1}
    if smoke:  # the code path only: 2 layers, every width / 16 (head counts kept divisible)
        layers = layers or 2
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in config:
                config[key] = max(64, config[key] // 16)
        config["vocab_size"] = 4096
        if model != "v2-lite":
            config["num_attention_heads"], config["num_key_value_heads"] = 4, 2
        else:
            config |= {"num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64,
                       "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 16}
    if layers:
        config["num_hidden_layers"] = layers
    return config


def build_checkpoint(config: dict, out: Path, seed: int = 0) -> Path:
    """A random bf16 checkpoint, one shard per layer, written one tensor at a time."""
    import torch
    from safetensors.torch import save_file

    from dsedge.models.registry import spec_from_config
    from dsedge.testing.tokenizer import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(config)
    shards: dict[str, list] = {}
    for t in spec.expected_tensors():
        shard = f"layer-{t.layer:03d}.safetensors" if t.layer is not None else "top.safetensors"
        shards.setdefault(shard, []).append(t)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for shard, tensors in shards.items():
        batch = {}
        for t in tensors:
            if t.name.endswith("norm.weight"):
                batch[t.name] = torch.ones(t.shape, dtype=torch.bfloat16)
            else:
                batch[t.name] = (torch.randn(t.shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[t.name] = shard
        save_file(batch, str(out / shard), metadata={"format": "pt"})
        del batch
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(out)
    return out


STEP = """
import json, os, sys, time
from dsedge.rss import peak_rss_bytes  # this process's own, not the driver's
args = json.loads(sys.argv[1])
started = time.perf_counter()
if args["step"] == "compress":
    from dsedge.compress.pipeline import compress
    compress(args["src"], args["out"], recipe=args["recipe"], method="rtn", evaluate=False, calib_tokens=512)
elif args["step"] == "compress-v3-layer":  # RTN everywhere; shards of 256 MiB so the writer's buffer stays small
    from dsedge.compress.pipeline import compress
    compress(args["src"], args["out"], recipe="int4-experts", method="rtn", evaluate=False,
             calib_tokens=args["calib_tokens"], seq_len=512, max_shard_bytes=256 << 20)
elif args["step"] == "export":
    from dsedge.export.bundle import export_bundle
    export_bundle(args["src"], args["out"], layout=args["layout"], max_context=1024)
else:  # measure: load, decode per token at each cached length, prefill of a prompt (decode_bench's code)
    sys.path.insert(0, "benchmarks")
    from decode_bench import dsedge_context_curve, dsedge_prefill_tps
    from dsedge.runtime import load_bundle
    from dsedge.runtime.session import own_process_threads
    own_process_threads()  # as the dsedge command does: a partitioned bundle's sessions share one thread pool
    engine = load_bundle(args["src"], memory_budget_bytes=args.get("budget"), verify=args.get("verify", True),
                         compose=args.get("compose", True))
    loaded = time.perf_counter() - started
    decode = dsedge_context_curve(engine, args["vocab"], args["contexts"], args["decode"])
    prefill = dsedge_prefill_tps(engine, args["vocab"], args["prompt"])
    experts = getattr(engine, "experts", None)
    print(json.dumps({"load_seconds": round(loaded, 3), "decode": decode, "prefill": prefill,
                      "experts": experts.stats.to_json() if experts is not None else None}))
print(json.dumps({"seconds": round(time.perf_counter() - started, 2),
                  "peak_rss_bytes": peak_rss_bytes()}))
"""
# dsedge preset -> the llama.cpp type of the same bits. int4 is groups of 128 with a float scale each (4.25
# bits per weight), Q4_0 blocks of 32 with an fp16 scale (4.5); int8 per channel, Q8_0 blocks of 32 (8.5).
# Both presets also make the head and the embedding int8 (llama.cpp: Q6_K head, Q4_0/Q8_0 embedding).
RECIPE_GGUF = {"int4": "Q4_0", "int8": "Q8_0"}
CONTEXTS, DECODE, PROMPT = [16, 512], 32, 512


def step(name: str, **args) -> dict:
    """One pipeline step in a fresh process (its own peak RSS; the load average around it)."""
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", STEP, json.dumps({"step": name, **args})], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out |= json.loads(line)
    return out | {"loadavg": [round(load, 2), round(os.getloadavg()[0], 2)]}


def bytes_in(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def llamacpp_ggufs(ckpt: Path, work: Path, types: list[str]) -> dict[str, Path]:
    """The checkpoint in GGUF at each llama.cpp type: converted once to bf16 (what it is stored in), then
    llama-quantize per type, the bf16 file deleted (disk)."""
    from decode_bench import llamacpp_script

    script = llamacpp_script()
    env = {**os.environ, "PYTHON": sys.executable}
    out = {t: work / f"{ckpt.name}.{t}.gguf" for t in types}
    if all(p.exists() for p in out.values()):
        return out
    bin_dir = subprocess.run(["bash", str(script), "build"], check=True, capture_output=True, text=True,
                             env=env).stdout.strip().splitlines()[-1]
    base = work / f"{ckpt.name}.bf16.gguf"
    if not base.exists():
        view = _converter_view(ckpt, work / f"{ckpt.name}.gguf-view")
        subprocess.run(["bash", str(script), "gguf", str(view), str(base), "bf16"], check=True, env=env)
        shutil.rmtree(view)
    for t, path in out.items():
        if not path.exists():
            subprocess.run([f"{bin_dir}/llama-quantize", str(base), str(path), t, str(os.cpu_count())],
                           check=True, env=env)
    base.unlink()
    return out


def _converter_view(ckpt: Path, view: Path) -> Path:
    """The checkpoint as llama.cpp's converter should see it: its files linked (no copy of the shards; the
    script copies what it is given), config.json patched. llama.cpp 0.3.36 tells a DeepSeek-V2 without q
    LoRA (V2-Lite) by its layer count (26 or 27, src/models/deepseek2.cpp ``is_lite``) and otherwise requires
    ``deepseek2.attention.q_lora_rank``; a V2-Lite cut to fewer layers gets ``q_lora_rank: 0``, which it
    reads as "no q LoRA" (``q_lora_rank > 0`` picks the tensors)."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for path in ckpt.iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((ckpt / "config.json").read_text())
    if config.get("model_type") == "deepseek_v2" and config.get("q_lora_rank") is None:
        config["q_lora_rank"] = 0
    (view / "config.json").write_text(json.dumps(config, indent=1))
    return view


def prepare(model: str, config: dict, work: Path, recipes: list[str], llamacpp: bool) -> dict:
    """Build the bf16 checkpoint, convert it for llama.cpp, compress each recipe (RTN) and export it with
    validation, deleting what the next step no longer needs. Returns what was measured on the way."""
    from dsedge.planning import plan

    ckpt = work / f"{model}-bf16"
    moe = bool(config.get("n_routed_experts"))
    layout = "partitioned" if moe else "monolithic"  # a dense model has no experts to place
    result = {"model": model, "layers": config["num_hidden_layers"], "layout": layout, "recipes": {}}
    shutil.rmtree(ckpt, ignore_errors=True)
    build_checkpoint(config, ckpt)
    result["checkpoint_bytes"] = bytes_in(ckpt)
    if llamacpp:
        ggufs = llamacpp_ggufs(ckpt, work, [RECIPE_GGUF[r] for r in recipes if r in RECIPE_GGUF])
        result["gguf"] = {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in ggufs.items()}
    for recipe in recipes:
        comp, bundle = work / f"{model}-{recipe}", work / f"{model}-{recipe}.bundle"
        for path in (comp, bundle):
            shutil.rmtree(path, ignore_errors=True)
        entry = result["recipes"][recipe] = {"compress": step("compress", src=str(ckpt), out=str(comp),
                                                                recipe=recipe)}
        print(f"{model} {recipe}: compressed {entry['compress']}", file=sys.stderr, flush=True)
        entry["export"] = step("export", src=str(comp), out=str(bundle), layout=layout)
        print(f"{model} {recipe}: exported {entry['export']}", file=sys.stderr, flush=True)
        planned = {r.scheme: r for r in plan(comp, context=1024, layout=layout).precisions}[recipe]
        entry["bundle"], entry["bundle_bytes"], entry["plan_bytes"] = str(bundle), bytes_in(bundle), \
            planned.weight_bytes
        entry["plan_error"] = round(planned.weight_bytes / entry["bundle_bytes"] - 1, 4)
        shutil.rmtree(comp)
    shutil.rmtree(ckpt)  # disk: every recipe is compressed
    return result


def measure(result: dict, rounds: int, vocab: int) -> dict:
    """Alternate dsedge (all experts resident; 25% of the routed-expert bytes under a budget) and llama-bench
    on the same checkpoint, per round, each dsedge run in a fresh process (load time, peak RSS). The first
    round's first load hashes every file (the verification is recorded); the later loads use the record."""
    from decode_bench import llamacpp_speeds
    from export_bench import read_bandwidth_gbps

    shape = {"vocab": vocab, "contexts": CONTEXTS, "decode": DECODE, "prompt": PROMPT}
    result["rounds"] = []
    for r in range(rounds):
        record = {"round": r, "loadavg": os.getloadavg(), "bandwidth_gbps": read_bandwidth_gbps(2), "cells": {}}
        for recipe, entry in result["recipes"].items():
            bundle = Path(entry["bundle"])
            cells = record["cells"][recipe] = {"resident": step("measure", src=str(bundle), **shape)}
            manifest = json.loads((bundle / "manifest.json").read_text())
            placement = manifest.get("placement") or {}
            if manifest.get("layout") == "partitioned":
                # the same bundle, every expert resident, graph by graph (layer_experts graphs; no composition)
                cells["resident_layered"] = step("measure", src=str(bundle), compose=False, **shape)
            if placement.get("expert_bytes"):
                budget = placement["expert_bytes"] // 4  # the runtime's budget is over expert partitions only
                cells["25pct"] = step("measure", src=str(bundle), budget=budget, **shape)
            gguf_type = RECIPE_GGUF.get(recipe)
            if gguf_type and gguf_type in result.get("gguf", {}):
                cells["llamacpp"] = llamacpp_speeds(Path(result["gguf"][gguf_type]["path"]), 2, CONTEXTS, DECODE,
                                                    PROMPT)
        record["loadavg_after"] = os.getloadavg()
        result["rounds"].append(record)
        print(f"round {r + 1}/{rounds} (load {record['loadavg'][0]:.2f} -> {record['loadavg_after'][0]:.2f})",
              file=sys.stderr, flush=True)
    return result


def summary(result: dict) -> dict:
    """Medians over rounds per recipe: decode tokens/s at each context, TTFT, ratios to llama.cpp."""
    import statistics

    out = {}
    for recipe in result["recipes"]:
        cells = [r["cells"][recipe] for r in result.get("rounds", [])]
        if not cells:
            continue
        row = {}
        for kind in ("resident", "resident_layered", "25pct", "llamacpp"):
            runs = [c[kind] for c in cells if kind in c]
            if not runs:
                continue
            row[kind] = {f"decode@{n}": statistics.median(float(x["decode"].get(n) or x["decode"].get(str(n)) or 0)
                                                          for x in runs) for n in CONTEXTS}
            row[kind]["ttft_ms"] = statistics.median(1000 * PROMPT / x["prefill"] for x in runs if x["prefill"])
            if kind != "llamacpp":
                row[kind]["load_seconds"] = [x["load_seconds"] for x in runs]
                row[kind]["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs)
                if runs[-1].get("experts"):
                    row[kind]["hit_rate"] = statistics.median(x["experts"]["hit_rate"] for x in runs)
        if "llamacpp" in row:
            row["ratio_resident"] = {k: round(row["resident"][k] / row["llamacpp"][k], 3)
                                     for k in row["llamacpp"] if k.startswith("decode") and row["llamacpp"][k]}
            row["ratio_resident"]["ttft"] = round(row["llamacpp"]["ttft_ms"] / row["resident"]["ttft_ms"], 3)
        if "resident_layered" in row:
            row["composed_vs_layered"] = {k: round(row["resident"][k] / row["resident_layered"][k], 3)
                                          for k in row["resident"] if k.startswith("decode")}
        if "25pct" in row:
            row["25pct_time_per_token_vs_resident"] = {
                k: round(row["resident"][k] / row["25pct"][k], 3) for k in row["resident"] if k.startswith("decode")}
        out[recipe] = row
    return out


def run(model: str, layers: int | None, smoke: bool, work: Path, configs: Path = CONFIGS, *,
        recipes: list[str] | None = None, rounds: int = 3, llamacpp: bool = False, phase: str = "all") -> dict:
    """prepare (build → gguf → compress → export) then measure, with the state in ``work/<model>.json``
    between phases (``phase``: prepare / measure / all)."""
    config = hf_config(model, layers, smoke, configs)
    recipes = recipes or (["int4"] if config.get("n_routed_experts") else ["int4", "int8"])
    state = work / f"{model}.state.json"
    work.mkdir(parents=True, exist_ok=True)
    if phase in ("prepare", "all"):
        result = prepare(model, config, work, recipes, llamacpp)
        result["smoke"] = smoke
        state.write_text(json.dumps(result, indent=1))
    result = json.loads(state.read_text())
    if phase in ("measure", "all"):
        result = measure(result, rounds, config["vocab_size"])
        result["summary"] = summary(result)
        state.write_text(json.dumps(result, indent=1))
    return result


def v3_layer_config(configs: Path = CONFIGS, width_div: int = 1) -> dict:
    """DeepSeek-V3's published config cut to one MoE decoder layer (no dense layers, no MTP, vocab 4096);
    ``width_div`` divides every width (hidden, intermediates, LoRA ranks, heads) for a smoke run."""
    config = json.loads((configs / MODELS["v3-layer"]).read_text())
    config |= {"num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0,
               "vocab_size": 4096}
    config.pop("quantization_config", None)  # write_random_checkpoint writes the FP8 one it stores
    if width_div > 1:
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
                    "num_attention_heads", "num_key_value_heads"):
            config[key] = max(1, config[key] // width_div)
    return config


GPTQ_STEP = """
import json, sys, time, torch
from dsedge.compress.calibration import expert_forward
from dsedge.compress.quant import HessianAccumulator, quantize
from dsedge.compress.recipes import load_recipe
from dsedge.models.checkpoint import Checkpoint
args = json.loads(sys.argv[1])
ckpt = Checkpoint(args["src"])
base = "model.layers.0.mlp.experts."
recipe = load_recipe("int4-experts")
x = torch.randn(args["tokens"], ckpt.spec.hidden_size) * 0.5  # the MoE input's scale after the norm
h_in = HessianAccumulator(x.shape[1]); h_in.add(x)
timed = {"gptq": 0.0, "rtn": 0.0}
params = 0
for e in range(args["experts"]):
    gate, up, down = (ckpt.read(f"{base}{e}.{k}.weight") for k in ("gate_proj", "up_proj", "down_proj"))
    params += gate.numel() + up.numel() + down.numel()
    gate_up = torch.cat([gate, up])
    h_down = HessianAccumulator(down.shape[1])
    h_down.add(expert_forward(gate_up, down, x, torch.nn.functional.silu)[0])
    for method in ("gptq", "rtn"):
        scheme = recipe.scheme_for(base + f"{e}.down_proj").with_method(method)
        t0 = time.perf_counter()
        quantize(gate_up, scheme, h_in if method == "gptq" else None, scale_dtype=torch.bfloat16)
        quantize(down, scheme, h_down if method == "gptq" else None, scale_dtype=torch.bfloat16)
        timed[method] += time.perf_counter() - t0
print(json.dumps({"experts": args["experts"], "params": params,
                  **{f"{m}_seconds_per_expert": round(t / args["experts"], 3) for m, t in timed.items()},
                  **{f"{m}_seconds_per_billion_params": round(t / params * 1e9, 2) for m, t in timed.items()}}))
"""


def run_v3_layer(work: Path, configs: Path = CONFIGS, width_div: int = 1, gptq_experts: int = 4,
                 calib_tokens: int = 2048) -> dict:
    """Build the FP8 V3 layer, compress it int4 (RTN) measuring peak RSS and time, time GPTQ vs RTN on a few
    experts, delete both checkpoints."""
    from dsedge.testing.random_checkpoint import write_random_checkpoint

    config = v3_layer_config(configs, width_div)
    ckpt, comp = work / "v3-layer-fp8", work / "v3-layer-int4"
    for path in (ckpt, comp):
        shutil.rmtree(path, ignore_errors=True)
    try:
        write_random_checkpoint(ckpt, config, fp8_block=128)
        layer = [p for p in ckpt.glob("layer-*.safetensors")]
        params = _layer_params(ckpt)
        result = {"model": "v3-layer", "width_div": width_div, "layer_params": params,
                  "layer_bytes_on_disk": sum(p.stat().st_size for p in layer), "calib_tokens": calib_tokens}
        compressed = step("compress-v3-layer", src=str(ckpt), out=str(comp), calib_tokens=calib_tokens)
        compressed["seconds_per_billion_params"] = round(compressed["seconds"] / params * 1e9, 2)
        peak = compressed["peak_rss_bytes"]
        compressed["peak_rss_gib"] = round(peak / 2**30, 2)
        compressed["goal_8gib"] = "met" if peak <= V3_LAYER_GOAL_BYTES else "missed"
        compressed["limit_12gib"] = "met" if peak <= V3_LAYER_LIMIT_BYTES else "EXCEEDED"
        result["compress_rtn"] = compressed
        result["compressed_bytes"] = bytes_in(comp)
        shutil.rmtree(comp)
        result["gptq_vs_rtn"] = _gptq_timing(ckpt, gptq_experts, calib_tokens)
        experts = config["n_routed_experts"]
        result["gptq_vs_rtn"]["gptq_seconds_per_layer_extrapolated"] = round(
            result["gptq_vs_rtn"]["gptq_seconds_per_expert"] * experts, 1)
        return result
    finally:
        for path in (ckpt, comp):
            shutil.rmtree(path, ignore_errors=True)


def _layer_params(path: Path) -> int:
    from dsedge.models.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    return sum(t.numel for n, t in ckpt.tensors.items() if n.startswith("model.layers.0.") and
               not n.endswith("_scale_inv"))


def _gptq_timing(ckpt: Path, experts: int, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", GPTQ_STEP, json.dumps({"src": str(ckpt), "experts": experts,
                                                                       "tokens": tokens})],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"GPTQ timing failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--layers", type=int, help="decoder layers kept (full width); default: all")
    parser.add_argument("--smoke", action="store_true", help="2 layers, widths / 16: checks the code path")
    parser.add_argument("--width-div", type=int, default=1, help="v3-layer: divide every width by this (smoke)")
    parser.add_argument("--gptq-experts", type=int, default=4, help="v3-layer: experts GPTQ is timed on")
    parser.add_argument("--calib-tokens", type=int, default=2048, help="v3-layer: calibration tokens")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--recipes", nargs="+", help="compress presets; default: int4 (MoE), int4 int8 (dense)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, dsedge and llama.cpp alternated")
    parser.add_argument("--llamacpp", action="store_true", help="llama.cpp on the same checkpoint (Q4_0/Q8_0)")
    parser.add_argument("--phase", choices=["prepare", "measure", "all"], default="all",
                        help="prepare (untimed build/compress/export) and measure (quiet machine) apart")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help=f"published configs (default {CONFIGS})")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    if args.model == "v3-layer":
        result = run_v3_layer(work, args.configs, args.width_div, args.gptq_experts, args.calib_tokens)
    else:
        result = run(args.model, args.layers, args.smoke, work, args.configs, recipes=args.recipes,
                     rounds=args.rounds, llamacpp=args.llamacpp, phase=args.phase)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
