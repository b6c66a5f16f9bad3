"""dsedge compress side by side with llm-compressor 0.14 (vLLM's quantizer) on the demo models.

Two parts, both correctness/quality (wall times are indicative only on a shared machine):

* ``side-by-side``: for deepseek-v3-tiny and qwen2-tiny and the recipes int4 g32, int4 g128 and int8, quantize
  with llm-compressor (``GPTQModifier``, W4A16 / W8A16) and with ``dsedge compress`` (same recipe, GPTQ), both
  calibrated on exactly the token windows dsedge's compress uses (``dsedge.compress.calibration``: the
  built-in text, 8192 tokens in 16 windows of 512); then, in this (dsedge) environment, score every output
  the same way: perplexity on ``heldout-all`` (the whole demo held-out text, 512-token windows, the
  evaluation of ``dsedge.evaluation``), top-1 agreement with the float model on the same tokens, size on
  disk, and ``dsedge export`` of llm-compressor's output (its exit status).
* ``gptq-layers``: for a few linears of each demo model, on the calibration inputs those linears see in the
  float model, the Hessian-weighted reconstruction error ``tr((W-Q) H (W-Q)ᵀ)`` (H = Σ xxᵀ) of RTN,
  dsedge's GPTQ, the reference algorithm (IST-DASLab ``fasterquant``, reimplemented below) and
  llm-compressor's GPTQ (``quantize_weight``, run in its venv on the same W and H).

llm-compressor pins transformers ≤ 5.17 and compressed-tensors 0.19, so it runs in its own virtualenv
(``--venv``, created on first use: ``python -m venv`` + ``pip install llmcompressor==0.14.*`` with the CPU
torch 2.13.0 wheel). This script re-runs itself in that venv with ``--worker`` for llm-compressor's steps.

    nice -n 10 .venv/bin/python benchmarks/llmcompressor_bench.py --out benchmarks/out/llmc all
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_VENV = HERE / "out" / "llmc-venv"
TORCH_PIN = "torch==2.13.0"
LLMC_PIN = "llmcompressor==0.14.*"
MODELS = ("deepseek-v3-tiny", "qwen2-tiny")
# label -> (dsedge preset, bits, group size or None for per channel)
RECIPES = {"int4-g32": ("int4-g32", 4, 32), "int4-g128": ("int4-g128", 4, 128), "int8": ("int8", 8, None)}
DAMP = 0.01  # both tools' default dampening fraction
# (model, linear) pairs for gptq-layers: attention, dense MLP and shared-expert projections of widths 64..576.
LAYERS = {
    "qwen2-tiny": ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.gate_proj",
                   "model.layers.2.mlp.down_proj", "model.layers.4.self_attn.o_proj"],
    "deepseek-v3-tiny": ["model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_b_proj",
                         "model.layers.2.self_attn.kv_b_proj", "model.layers.3.mlp.shared_experts.down_proj"],
}


# ----------------------------------------------------------------------------- environment


def ensure_venv(venv: Path) -> Path:
    """The llm-compressor venv's python (created and filled on first use)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The CPU torch wheel first: an unpinned torch from PyPI is the multi-GB CUDA build.
    cpu = ["--index-url", "https://download.pytorch.org/whl/cpu", "--extra-index-url", "https://pypi.org/simple"]
    subprocess.run([python, "-m", "pip", "install", "-q", *cpu, TORCH_PIN], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", TORCH_PIN, LLMC_PIN, "transformers<=5.17"], check=True)
    return python


def run_worker(python: Path, job: dict, out: Path) -> dict:
    """Run one llm-compressor job in its venv; the job's result JSON (``error`` set when it failed)."""
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    job_file.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the worker must not import this dsedge
    started = time.perf_counter()
    proc = subprocess.run([python, __file__, "--worker", str(job_file)], capture_output=True, text=True, env=env)
    (out / "worker.log").write_text(proc.stdout + proc.stderr)
    result_file = out / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if proc.returncode != 0 and "error" not in result:
        result["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    result["wall_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------- worker (llm-compressor venv)


def worker(job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    result_file = job_file.parent / "result.json"
    try:
        result = {"quantize": _worker_quantize, "layers": _worker_layers}[job["kind"]](job)
    except Exception as exc:  # recorded, not raised: "llm-compressor cannot do X" is a result
        result = {"error": f"{type(exc).__name__}: {exc}"}
        result_file.write_text(json.dumps(result))
        raise
    result_file.write_text(json.dumps(result))


def _weight_args(bits: int, group: int | None) -> dict:
    strategy = {"strategy": "group", "group_size": group} if group else {"strategy": "channel"}
    return {"num_bits": bits, "type": "int", "symmetric": True, **strategy}


def _worker_quantize(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = torch.load(job["windows"])
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")  # bf16 as stored, as usual
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"],
                                                      "weights": _weight_args(job["bits"], job["group"])}},
                          ignore=["lm_head", "re:.*mlp.gate$"], dampening_frac=DAMP, block_size=128)
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=windows.shape[1],
            num_calibration_samples=windows.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(job["output"], save_compressed=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(job["model"]) / name).exists():
            shutil.copy(Path(job["model"]) / name, Path(job["output"]) / name)
    return {"quantize_s": seconds}


def _worker_layers(job: dict) -> dict:
    """llm-compressor's GPTQ on saved (W, H) pairs, the way ``GPTQModifier`` calls it: a Linear given the
    scheme, its weight observer's qparams (memoryless min/max on the original weight), ``quantize_weight``
    with the Hessian normalized by its sample count, and GPTQModifier's default ``actorder: static``."""
    import torch
    from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle import initialize_module_for_quantization
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.quantization.calibration import initialize_observer

    cases = torch.load(job["cases"])
    errors = {}
    for key, case in cases.items():
        W, H = case["W"].float(), case["H"]
        linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        linear.weight.data = W.clone()
        args = QuantizationArgs(**_weight_args(case["bits"], case["group"]), actorder=ActivationOrdering.STATIC)
        try:
            initialize_module_for_quantization(linear, QuantizationScheme(targets=["Linear"], weights=args))
            initialize_observer(linear, "weight")
            linear.weight_observer(linear.weight)
            qp = linear.weight_observer.get_qparams()
            q_weight, *_ = quantize_weight(W[None].clone(), (H / case["n"]).float()[None], qp["scale"][None],
                                           qp["zero_point"][None], None, args, blocksize=128, percdamp=DAMP)
        except Exception as exc:  # e.g. a group size that does not divide the width
            errors[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        d = W.double() - q_weight[0].double()
        errors[key] = {"err": float(torch.einsum("oi,ij,oj->", d, H.double(), d))}
    return {"layers": errors}


# ----------------------------------------------------------------------------- calibration & evaluation


def calibration_windows(model: str):
    """The calibration and held-out windows ``dsedge compress`` uses by default for ``model``."""
    from dsedge.compress import calibration as cal
    from dsedge.compress.pipeline import DEFAULT_CALIB_TOKENS, DEFAULT_HELDOUT_TOKENS, DEFAULT_SEQ_LEN
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.sources import resolve_checkpoint

    ckpt = Checkpoint(resolve_checkpoint(model))
    return cal.load_calibration(ckpt.path / "tokenizer.json", None, calib_tokens=DEFAULT_CALIB_TOKENS,
                                heldout_tokens=DEFAULT_HELDOUT_TOKENS,
                                seq_len=min(DEFAULT_SEQ_LEN, ckpt.spec.max_position_embeddings))


class HeldoutScorer:
    """``heldout-all`` perplexity of a checkpoint (``dsedge.evaluation``) and its top-1 agreement with the
    float model on the same scored positions (each window's logits except the last position)."""

    def __init__(self, model: str, max_tokens: int | None):
        from dsedge.demo import heldout_path
        from dsedge.evaluation import encode_text_file
        from dsedge.sources import resolve_checkpoint

        self.ids = encode_text_file(resolve_checkpoint(model) / "tokenizer.json", heldout_path())[:max_tokens]
        self.reference_top1 = None
        self.reference = self.score(resolve_checkpoint(model))

    def score(self, path: Path) -> dict:
        import numpy as np

        from dsedge.evaluation import evaluate_perplexity, torch_logits_fn
        from dsedge.models.checkpoint import Checkpoint
        from dsedge.models.reference import reference_model

        logits_fn, top1 = torch_logits_fn(reference_model(Checkpoint(path))), []

        def recording(batch):
            logits = logits_fn(batch)
            top1.extend(row[:-1].argmax(-1) for row in logits)  # position j predicts token j+1
            return logits

        report = evaluate_perplexity(recording, self.ids, window=512, batch_size=8).to_json()
        top1 = np.concatenate(top1)
        if self.reference_top1 is None:
            self.reference_top1 = top1
        report["top1_agreement"] = float((top1 == self.reference_top1).mean())
        return report


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def export_status(path: Path, out: Path) -> dict:
    """``dsedge export`` of a checkpoint (validation on): its exit status and last line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dsedge.cli", "export", str(path), "-o", str(out), "--overwrite"],
                          capture_output=True, text=True, env=env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"rc": proc.returncode, "last_line": tail[-1] if tail else ""}


# ----------------------------------------------------------------------------- side by side


def side_by_side(args, python: Path) -> list[dict]:
    import torch

    from dsedge.compress.pipeline import compress
    from dsedge.sources import resolve_checkpoint

    results = []
    for model in args.models:
        calib = calibration_windows(model)
        windows_file = args.out / f"{model}.calib.pt"
        torch.save(calib.calib, windows_file)
        scorer = HeldoutScorer(model, args.max_tokens)
        base = {"model": model, "tool": "original", "recipe": "bf16", "bytes": dir_bytes(resolve_checkpoint(model)),
                "heldout": scorer.reference}
        results.append(base)
        _save(args.out, results)
        for label in args.recipes:
            preset, bits, group = RECIPES[label]
            for variant in args.dsedge_variants:
                out = args.out / f"{model}--dsedge-{label}-{variant}"
                started = time.perf_counter()
                compress(model, out, recipe=dsedge_recipe(preset, variant, args.out), method=None, overwrite=True)
                results.append({"model": model, "tool": f"dsedge {variant}", "recipe": label,
                                "wall_s": time.perf_counter() - started, "bytes": dir_bytes(out),
                                "heldout": scorer.score(out)})
                _save(args.out, results)
                print(json.dumps(results[-1]), flush=True)
            out = args.out / f"{model}--llmc-{label}"
            shutil.rmtree(out, ignore_errors=True)
            job = {"kind": "quantize", "model": str(resolve_checkpoint(model)), "windows": str(windows_file),
                   "bits": bits, "group": group, "output": str(out)}
            row = {"model": model, "tool": "llm-compressor", "recipe": label, **run_worker(python, job, out)}
            if "error" not in row:
                row |= {"bytes": dir_bytes(out), "heldout": scorer.score(out),
                        "export": export_status(out, args.out / f"{model}--llmc-{label}.bundle")}
            results.append(row)
            _save(args.out, results)
            print(json.dumps(row), flush=True)
    return results


def dsedge_recipe(preset: str, variant: str, out: Path) -> str:
    """The preset, or a recipe file of it with every rule's method (and act-order) set by ``variant``
    (``gptq``, ``rtn``, ``gptq-act``: GPTQ with act-order, static groups — llm-compressor's default)."""
    from dsedge.compress.recipes import preset as load_preset

    data = load_preset(preset).to_json()
    method = "rtn" if variant == "rtn" else "gptq"
    data["method"] = method
    for rule in data["rules"]:
        if rule.get("quant"):
            rule["quant"] |= {"method": method, "act_order": variant == "gptq-act"}
    path = out / f"recipe-{preset}-{variant}.json"
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def _save(out: Path, results: list[dict]) -> None:
    (out / "side_by_side.json").write_text(json.dumps(results, indent=2) + "\n")


def slice_name(max_tokens: int | None) -> str:
    """The demo model card's name of the scored slice (``heldout-16k`` = the first 16,384 tokens)."""
    return "heldout-all" if max_tokens is None else f"heldout-{max_tokens // 1024}k"


def side_by_side_markdown(results: list[dict], max_tokens: int | None = None) -> str:
    lines = [f"| model | recipe | tool | `{slice_name(max_tokens)}` ppl | Δ ppl | top-1 agreement | size (MiB) "
             "| wall (s) | export |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r for r in results if r["tool"] == "original"}
    for r in results:
        if "error" in r:
            failure = f"fails: `{r['error'][:140]}`"
            lines.append(f"| {r['model']} | {r['recipe']} | {r['tool']} | — | — | — | — | — | {failure} |")
            continue
        ppl = r["heldout"]["perplexity"]
        delta = "—" if r["tool"] == "original" else f"{ppl - base[r['model']]['heldout']['perplexity']:+.3f}"
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "—"
        export = "—" if "export" not in r else ("exit 0" if r["export"]["rc"] == 0 else f"exit {r['export']['rc']}")
        lines.append(f"| {r['model']} | {r['recipe']} | {r['tool']} | {ppl:.3f} | {delta} | "
                     f"{r['heldout']['top1_agreement']:.2%} | {r['bytes'] / 2**20:.2f} | {wall} | {export} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- GPTQ on real weights


def reference_gptq(W, H, bits: int, group: int | None, *, damp: float = DAMP, block: int = 128,
                   act_order: bool = False):
    """IST-DASLab/gptq ``GPTQ.fasterquant`` (symmetric quantizer, ``static_groups=False``), dequantized weights.

    As the reference: dead inputs zeroed, damping ``damp · mean diag``, Cholesky of H⁻¹, block-lazy updates,
    a group's scale from ``W`` when the group starts (``W`` holds the updates of earlier blocks only).
    """
    import torch

    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    maxq = 2 ** bits - 1
    Q = torch.zeros_like(W)

    def params(x):
        amax = x.abs().amax(1).clamp(min=1e-12)
        return 2 * amax / maxq

    scale = params(W) if group is None else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group is not None and (i1 + i) % group == 0:
                scale = params(W[:, i1 + i:i1 + i + group])
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / scale) + (maxq + 1) / 2, 0, maxq) - (maxq + 1) / 2) * scale
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def layer_cases(model: str, bits_groups) -> dict:
    """(W, H) of the chosen linears of ``model`` on its calibration windows, one case per (linear, recipe)."""
    import torch

    from dsedge.compress.quant import HessianAccumulator
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model
    from dsedge.sources import resolve_checkpoint

    net = reference_model(Checkpoint(resolve_checkpoint(model)))
    modules = dict(net.named_modules())
    accs = {n: HessianAccumulator(modules[n].in_features) for n in LAYERS[model]}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: accs[n].add(a[0])) for n in accs]
    with torch.no_grad():
        for batch in calibration_windows(model).calib.split(4):
            net(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return {f"{model}:{n}:int{b}-{'g' + str(g) if g else 'ch'}": {"W": modules[n].weight.detach().clone(),
                                                                    "H": accs[n].hessian, "n": accs[n].n_samples,
                                                                    "bits": b, "group": g}
            for n in accs for b, g in bits_groups}


def hessian_error(W, Q, H) -> float:
    import torch

    d = W.double() - Q.double()
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


def gptq_layers(args, python: Path) -> dict:
    import torch

    from dsedge.compress.quant import quantize_gptq, quantize_rtn
    from dsedge.quantformat.scheme import QuantScheme
    from dsedge.quantformat.tensor import dequantize

    bits_groups = [(4, 32), (4, 128), (8, None)]
    cases = {}
    for model in args.models:
        cases |= layer_cases(model, bits_groups)
    cases_file = args.out / "gptq_cases.pt"
    torch.save(cases, cases_file)
    llmc = run_worker(python, {"kind": "layers", "cases": str(cases_file)}, args.out / "gptq-layers-llmc")
    rows = {}
    for key, case in cases.items():
        W, H, bits, group = case["W"], case["H"], case["bits"], case["group"]
        scheme = QuantScheme(bits=bits, group_size=group, method="gptq")
        rtn = hessian_error(W, dequantize(quantize_rtn(W, scheme, scale_dtype=torch.float32)), H)
        row = {"rtn": rtn,
               "dsedge": hessian_error(W, dequantize(quantize_gptq(W, H, scheme, scale_dtype=torch.float32)), H),
               "dsedge_act": hessian_error(W, dequantize(quantize_gptq(
                   W, H, QuantScheme(bits=bits, group_size=group, method="gptq", act_order=True),
                   scale_dtype=torch.float32)), H),
               "reference": hessian_error(W, reference_gptq(W, H, bits, group), H),
               "llmc": llmc.get("layers", {}).get(key, {}).get("err", llmc.get("layers", {}).get(key, {}).get(
                   "error", llmc.get("error")))}
        rows[key] = row
        print(key, json.dumps({k: (v / rtn if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    (args.out / "gptq_layers.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def gptq_layers_markdown(rows: dict) -> str:
    lines = ["| linear (model:name:recipe) | RTN err | dsedge GPTQ | dsedge GPTQ act-order | reference fasterquant "
             "| llm-compressor GPTQ |", "|---|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        cells = [f"{r['rtn']:.4g}"]
        for k in ("dsedge", "dsedge_act", "reference", "llmc"):
            v = r[k]
            ok = isinstance(v, float) and math.isfinite(v)
            cells.append(f"{v / r['rtn']:.3f}" if ok else f"fails ({str(v)[:60]})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("all", "side-by-side", "gptq-layers"))
    parser.add_argument("--out", type=Path, default=HERE / "out" / "llmc")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--dsedge-variants", nargs="*", default=["gptq", "rtn", "gptq-act"],
                        choices=["gptq", "rtn", "gptq-act"])
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens scored (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(args.venv)
    if args.part in ("all", "gptq-layers"):
        print(gptq_layers_markdown(gptq_layers(args, python)))
    if args.part in ("all", "side-by-side"):
        print(side_by_side_markdown(side_by_side(args, python), args.max_tokens))


if __name__ == "__main__":
    main()
