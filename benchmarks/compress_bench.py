"""`dsedge compress` at scale: peak RSS against the layer count, and throughput of RTN vs GPTQ.

A random DeepSeek-V3-shaped MoE checkpoint (MLA with q-LoRA, noaux_tc routing over 4 groups, 16 routed
experts + 1 shared, a dense first layer) is written at a base layer count and at 2x and 4x it, layer by layer
(one shard per layer, bf16). Each run compresses it in a fresh process (`int4-experts`, the MoE preset) and
reports the process's peak RSS (its own VmHWM, Python + torch + transformers included), elapsed time, and
quantized parameters per second of the per-layer work (calibration forward, statistics, quantization,
propagation; startup, tokenization and the final quality evaluation excluded); the same model is
compressed with RTN and with GPTQ. Random weights make perplexity meaningless here: quality deltas of
real (trained) models are in docs/compress.md's table.

    nice -n 10 .venv/bin/python benchmarks/compress_bench.py [--layers 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1,
    "first_k_dense_replace": 1, "hidden_size": 512, "intermediate_size": 1024, "kv_lora_rank": 128,
    "max_position_embeddings": 1024, "moe_intermediate_size": 256, "n_group": 4, "n_routed_experts": 16,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 8, "num_experts_per_tok": 4,
    "num_key_value_heads": 8, "num_nextn_predict_layers": 0, "q_lora_rank": 192, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16, "rms_norm_eps": 1e-06, "rope_interleave": True,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False, "topk_group": 2, "v_head_dim": 32, "vocab_size": 4000,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc",
}

RUN = """
import json, sys
from dsedge.compress.pipeline import compress
r = compress(sys.argv[1], sys.argv[2], recipe="int4-experts", method=sys.argv[3], calib_tokens=int(sys.argv[4]),
             heldout_tokens=1024, seq_len=512, max_shard_bytes=16 << 20)
print(json.dumps({"elapsed_s": r.elapsed_s, "peak_rss_bytes": r.peak_rss_bytes, "bytes_before": r.bytes_before,
                  "bytes_after": r.bytes_after, "quality": r.quality,
                  "layer_seconds": sum(layer["seconds"] for layer in r.layers)}))
"""


def write_checkpoint(path: Path, layers: int, seed: int = 0) -> int:
    """A random checkpoint of ``layers`` layers, one shard per layer (bf16); returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from dsedge.demo import model_path
    from dsedge.models.registry import spec_from_config

    path.mkdir(parents=True)
    config = CONFIG | {"num_hidden_layers": layers}
    spec = spec_from_config(config, "bench")
    by_shard: dict[str, list] = {}
    for t in spec.expected_tensors():
        by_shard.setdefault("other" if t.layer is None else f"{t.layer:05d}", []).append(t)
    gen = torch.Generator().manual_seed(seed)
    weight_map, params = {}, 0
    for i, (_, tensors) in enumerate(sorted(by_shard.items())):
        file = f"model-{i + 1:05d}-of-{len(by_shard):05d}.safetensors"
        data = {t.name: _random(t, gen) for t in tensors}
        save_file(data, str(path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(data, file)
        params += sum(t.numel for t in tensors)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy(model_path("deepseek-v3-tiny") / "tokenizer.json", path / "tokenizer.json")  # vocab 4000
    return params


def _random(t, gen):
    import torch

    if t.name.endswith("norm.weight"):
        return torch.ones(t.shape, dtype=torch.bfloat16)
    if t.name.endswith("e_score_correction_bias"):
        return torch.zeros(t.shape, dtype=torch.float32)
    return (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)


def run(src: Path, out: Path, method: str, calib_tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, str(src), str(out), method, str(calib_tokens)],
                          capture_output=True, text=True, check=True)
    shutil.rmtree(out)
    return json.loads(proc.stdout.splitlines()[-1])


def quantized_params(src: Path) -> int:
    from dsedge.compress.recipes import load_recipe
    from dsedge.models.checkpoint import Checkpoint

    spec = Checkpoint(src).spec
    shapes = {t.name.removesuffix(".weight"): t.shape for t in spec.expected_tensors() if t.linear}
    return sum(shapes[m][0] * shapes[m][1] for m, s in load_recipe("int4-experts").plan(spec).items() if s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="base layer count (runs 1x, 2x, 4x)")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 2, 4):
            layers = args.layers * factor
            src = Path(tmp) / f"src-{layers}"
            t = time.perf_counter()
            params = write_checkpoint(src, layers)
            print(f"wrote {layers} layers, {params / 1e6:.1f} M params in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr, flush=True)
            qparams = quantized_params(src)
            for method in ("rtn", "gptq"):
                result = run(src, Path(tmp) / "out", method, args.calib_tokens)
                rows.append({"layers": layers, "method": method, "params": params, "quantized_params": qparams,
                             **result, "quantized_params_per_s": qparams / result["layer_seconds"]})
                print(layers, method, f"{result['elapsed_s']:.1f} s",
                      f"{result['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            shutil.rmtree(src)
    print(f"{'layers':>6} {'method':>6} {'params':>9} {'bf16 on disk':>13} {'peak RSS':>10} {'total':>8} "
          f"{'in layers':>9} {'quantized params/s':>19}")
    for r in rows:
        print(f"{r['layers']:>6} {r['method']:>6} {r['params'] / 1e6:>8.1f}M {r['bytes_before'] / 2**20:>9.1f} MiB "
              f"{r['peak_rss_bytes'] / 2**20:>6.0f} MiB {r['elapsed_s']:>6.1f} s {r['layer_seconds']:>7.1f} s "
              f"{r['quantized_params_per_s'] / 1e6:>16.2f} M")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
