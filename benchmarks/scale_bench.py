"""Real size (issue 13): random-weight checkpoints with published shapes, through compress → export → run.

Models (configs in ``../shared/configs/``):
- ``r1-distill-qwen-1.5b``: ``DeepSeek-R1-Distill-Qwen-1.5B.json`` (an HF Qwen2 config, used as is).
- ``v2-lite``: ``deepseek-v3-repo-inference-config_16B.json`` in DeepSeek's reference key names (``dim``,
  ``n_layers``, ``moe_inter_dim``…), mapped to an HF ``deepseek_v2`` config by :func:`v2_lite_hf_config`.

Each checkpoint is written in bf16 one layer per shard, one tensor at a time (memory follows one tensor), with
the tiny test tokenizer (random weights: the text is meaningless, the shapes are not). Per model, each step
in a fresh process whose peak RSS (``ru_maxrss``) is recorded: compress ``int4-experts`` (RTN), export
partitioned with validation, then greedy decode with all experts resident and under a budget that keeps 25%
of the routed-expert bytes resident. Order (disk: V2-Lite ≈ 31 GB bf16 at full depth): build, compress,
delete the bf16 checkpoint, export, delete the compressed one, run.

    nice -n 10 .venv/bin/python benchmarks/scale_bench.py --model v2-lite --layers 8 --work /data/scale --json v2.json
    nice -n 10 .venv/bin/python benchmarks/scale_bench.py --model r1-distill-qwen-1.5b --work /data/scale
    .venv/bin/python benchmarks/scale_bench.py --model v2-lite --smoke   # 2 layers, dims / 16: the code path only

``--layers`` keeps full width and cuts depth (per-layer figures extrapolate; docs/scale.md). Timing numbers
are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/configs beside the checkout (or beside the worktrees' parent); --configs overrides
CONFIGS = next((p for p in (ROOT.parent / "shared" / "configs", ROOT.parents[1] / "shared" / "configs") if p.is_dir()),
               ROOT.parent / "shared" / "configs")
MODELS = {"r1-distill-qwen-1.5b": "DeepSeek-R1-Distill-Qwen-1.5B.json",
          "v2-lite": "deepseek-v3-repo-inference-config_16B.json"}


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
import json, resource, sys, time
args = json.loads(sys.argv[1])
started = time.perf_counter()
if args["step"] == "compress":
    from dsedge.compress.pipeline import compress
    compress(args["src"], args["out"], recipe="int4-experts", method="rtn", evaluate=False, calib_tokens=512)
elif args["step"] == "export":
    from dsedge.export.bundle import export_bundle
    export_bundle(args["src"], args["out"], layout="partitioned", max_context=1024)
else:
    from dsedge.runtime import load_bundle
    engine = load_bundle(args["src"], memory_budget_bytes=args.get("budget"))
    result = engine.generate([0, 17, 99, 5], max_new_tokens=16)
    print(json.dumps({"timings": result.timings}))
print(json.dumps({"seconds": round(time.perf_counter() - started, 2),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def step(name: str, **args) -> dict:
    """One pipeline step in a fresh process (its own peak RSS)."""
    proc = subprocess.run([sys.executable, "-c", STEP, json.dumps({"step": name, **args})], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out |= json.loads(line)
    return out


def bytes_in(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(model: str, layers: int | None, smoke: bool, work: Path, configs: Path = CONFIGS) -> dict:
    from dsedge.planning import plan

    config = hf_config(model, layers, smoke, configs)
    ckpt, comp, bundle = work / f"{model}-bf16", work / f"{model}-int4", work / f"{model}-bundle"
    for path in (ckpt, comp, bundle):
        shutil.rmtree(path, ignore_errors=True)
    build_checkpoint(config, ckpt)
    result = {"model": model, "layers": config["num_hidden_layers"], "smoke": smoke,
              "checkpoint_bytes": bytes_in(ckpt)}
    result["compress"] = step("compress", src=str(ckpt), out=str(comp))
    shutil.rmtree(ckpt)  # disk: the bf16 checkpoint is no longer needed
    result["export"] = step("export", src=str(comp), out=str(bundle))
    planned = {r.scheme: r for r in plan(comp, context=1024, layout="partitioned").precisions}["int4-experts"]
    shutil.rmtree(comp)
    result["bundle_bytes"], result["plan_bytes"] = bytes_in(bundle), planned.weight_bytes
    manifest = json.loads((bundle / "manifest.json").read_text())
    placement = manifest.get("placement") or {}
    result["run_resident"] = step("run", src=str(bundle))
    if placement.get("expert_bytes"):
        budget = placement["trunk_bytes"] + placement["kv_cache_bytes"] + placement["expert_bytes"] // 4 + 256 * 2**20
        result["run_25pct"] = step("run", src=str(bundle), budget=budget)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--layers", type=int, help="decoder layers kept (full width); default: all")
    parser.add_argument("--smoke", action="store_true", help="2 layers, widths / 16: checks the code path")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help=f"published configs (default {CONFIGS})")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    result = run(args.model, args.layers, args.smoke, work, args.configs)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
