"""The quantized operators export uses, measured: MatMulNBits at accuracy level 0 vs 4 (and fp32 MatMul), the
routed experts of one ds3bench layer as one QMoE vs per-expert MatMulNBits dispatch, and what level 4 (int8
activations) does to the demo model's held-out perplexity and to the logits export validates.

    .venv/bin/python benchmarks/quantized_ops_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import OUT  # noqa: E402 — sibling script, not a package

from dsedge.export.graph import FLOAT, GraphBuilder  # noqa: E402
from dsedge.export.moe import dispatch_experts, qmoe_experts, qmoe_scheme  # noqa: E402
from dsedge.export.quantized import QuantizedWeight  # noqa: E402

THREADS = 2


def _session(g: GraphBuilder) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(g.model().SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ms(session, feeds: dict, n: int = 30) -> float:
    for _ in range(3):
        session.run(None, feeds)
    started = time.perf_counter()
    for _ in range(n):
        session.run(None, feeds)
    return (time.perf_counter() - started) / n * 1e3


def _weight(rng, bits: int, out: int, cols: int, group: int, level: int) -> QuantizedWeight:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return QuantizedWeight(rng.integers(lo, hi + 1, size=(out, cols)).astype(np.int8),
                           (rng.random((out, -(-cols // group))) * 0.01 + 5e-3).astype(np.float32), None, bits,
                           group, level)


def matmul_levels(size: int = 2048) -> list[dict]:
    """One [1, K] x [K, N] product: fp32 MatMul vs MatMulNBits int4/int8 g32 at accuracy level 0 and 4."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size)).astype(np.float32)
    rows = []
    for label, weight in [("fp32 MatMul", rng.standard_normal((size, size)).astype(np.float32) * 0.02),
                          *[(f"int{b} g32 level {lv}", _weight(rng, b, size, size, 32, lv))
                            for b in (4, 8) for lv in (0, 4)]]:
        g = GraphBuilder("m")
        g.output(g.linear(g.input("x", FLOAT, [1, size]), weight, "w"), "y", FLOAT, [1, size])
        rows.append({"op": label, "ms": round(_ms(_session(g), {"x": x}), 4)})
    return rows


class _Moe:
    n_routed_experts, num_experts_per_tok, moe_intermediate_size = 32, 4, 512


class _Spec:
    hidden_size, moe = 1024, _Moe


def qmoe_vs_dispatch() -> list[dict]:
    """ds3bench's routed experts (32 x SwiGLU 1024->512, top-4, int4 g32): QMoE vs per-expert dispatch."""
    rng = np.random.default_rng(0)
    w = {f"experts.{e}.{k}.weight": _weight(rng, 4, *shape, 32, 4) for e in range(32)
         for k, shape in (("gate_proj", (512, 1024)), ("up_proj", (512, 1024)), ("down_proj", (1024, 512)))}
    sessions = {}
    for path in ("dispatch", "qmoe"):
        g = GraphBuilder(path)
        x, idx, wt = (g.input("x", FLOAT, ["N", 1024]), g.input("idx", 7, ["N", 4]), g.input("w", FLOAT, ["N", 4]))
        out = (qmoe_experts(g, _Spec, w, "", x, idx, wt, qmoe_scheme(_Spec, w, "")) if path == "qmoe"
               else dispatch_experts(g, _Moe, w, "", x, idx, wt, range(32)))
        g.output(out, "y", FLOAT, ["N", 1024])
        sessions[path] = _session(g)
    rows = []
    for tokens in (1, 8, 128):
        feeds = {"x": rng.standard_normal((tokens, 1024)).astype(np.float32),
                 "idx": np.stack([rng.choice(32, 4, replace=False) for _ in range(tokens)]).astype(np.int64),
                 "w": rng.random((tokens, 4)).astype(np.float32)}
        a, b = (sessions[p].run(None, feeds)[0] for p in ("dispatch", "qmoe"))
        rows.append({"tokens": tokens, "dispatch_ms": round(_ms(sessions["dispatch"], feeds), 3),
                     "qmoe_ms": round(_ms(sessions["qmoe"], feeds), 3),
                     "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max())})
    return rows


def demo_accuracy_levels(tokens: int = 8192) -> dict:
    """deepseek-v3-tiny compressed int4-experts, exported at level 0 and 4: held-out perplexity of each bundle
    and the mean KL of level 4 vs the dequantized reference on validation's random prompt and on text."""
    import torch

    from dsedge.compress.pipeline import compress
    from dsedge.demo import heldout_path
    from dsedge.evaluation import encode_text_file, evaluate_perplexity
    from dsedge.export.bundle import export_bundle
    from dsedge.export.validate import mean_kl
    from dsedge.models.checkpoint import Checkpoint
    from dsedge.models.reference import reference_model
    from dsedge.runtime import load_bundle

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        ckpt = Path(tmp) / "ckpt"
        compress("deepseek-v3-tiny", ckpt, recipe="int4-experts", evaluate=False)
        ids = encode_text_file(ckpt / "tokenizer.json", heldout_path())[:tokens]
        result, engines = {}, {}
        for level in (0, 4):
            export_bundle(ckpt, Path(tmp) / f"b{level}", max_context=512, validate=False, accuracy_level=level)
            engines[level] = load_bundle(Path(tmp) / f"b{level}")
            report = evaluate_perplexity(lambda batch, e=engines[level]: np.stack([e.logits(b) for b in batch]), ids,
                                         window=256, batch_size=1)
            result[f"perplexity_level_{level}"] = report.perplexity
        reference = reference_model(Checkpoint(ckpt))
        prompts = {"random": [int(t) for t in np.random.default_rng(0).integers(2, 4000, size=24)], "text": ids[:64]}
        for name, prompt in prompts.items():
            with torch.no_grad():
                want = reference(torch.tensor([prompt])).logits[0].numpy()
            got = engines[4].logits(prompt)
            result[f"level_4_{name}"] = {"mean_kl": mean_kl(want, got), "max_abs_err": float(np.abs(got - want).max())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    results = {"matmul": matmul_levels(), "qmoe_vs_dispatch": qmoe_vs_dispatch(),
               "demo_accuracy_levels": demo_accuracy_levels()}
    print(json.dumps(results, indent=2))
    (args.json or OUT / "quantized_ops_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
