"""Absorbed MLA's per-head products at lower precision, with the stock onnxruntime ops that can express them.

Absorbed MLA multiplies the query by ``w_uk`` and the attention output by ``w_uv`` head by head
(``[B, H, T, K] @ [H, K, N]``); export stores both fp32 (ds3bench: 16.8 MB of a 95 MB int4 step). MatMulNBits
takes one 2-D matrix, so a quantized per-head product has to be one of: fp16 weights cast to fp32 before an
fp32 MatMul, an fp16 MatMul, or int8 weights in ``DynamicQuantizeMatMul`` (a batched B with per-head, per-column
scales runs on CPU). Each variant is a graph of ``--count`` distinct products (more bytes than the L3 cache,
so that they are read from memory as in a decode step), timed in interleaved rounds in one process.

    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 64 256 --count 48     # ds3bench w_uk
    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 256 64 --count 48     # ds3bench w_uv
    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 128 512 --count 16    # V2-Lite w_uk
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

VARIANTS = ("fp32", "fp16-cast", "fp16-matmul", "int8-dqmm")


def product_nodes(kind: str, i: int, weight: np.ndarray) -> tuple[list, list]:
    """Nodes and initializers computing ``y{i} = q @ weight`` in the variant's precision."""
    y, w = f"y{i}", f"w{i}"
    if kind == "fp32":
        return [helper.make_node("MatMul", ["q", w], [y])], [numpy_helper.from_array(weight, w)]
    if kind == "fp16-cast":
        return ([helper.make_node("Cast", [w], [w + "_f"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["q", w + "_f"], [y])],
                [numpy_helper.from_array(weight.astype(np.float16), w)])
    if kind == "fp16-matmul":  # "q16" is cast once for every product
        return ([helper.make_node("MatMul", ["q16", w], [y + "_h"]),
                 helper.make_node("Cast", [y + "_h"], [y], to=TensorProto.FLOAT)],
                [numpy_helper.from_array(weight.astype(np.float16), w)])
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127  # [H, 1, N]: per head, per output column
    codes = np.round(weight / scale).astype(np.int8)
    return ([helper.make_node("DynamicQuantizeMatMul", ["q", w, w + "_s"], [y], domain="com.microsoft")],
            [numpy_helper.from_array(codes, w), numpy_helper.from_array(scale.astype(np.float32), w + "_s")])


def session(kind: str, weights: list[np.ndarray], threads: int) -> ort.InferenceSession:
    heads, k, _ = weights[0].shape
    nodes = [helper.make_node("Cast", ["q"], ["q16"], to=TensorProto.FLOAT16)] if kind == "fp16-matmul" else []
    initializers, outputs = [], []
    for i, weight in enumerate(weights):
        more_nodes, more_inits = product_nodes(kind, i, weight)
        nodes += more_nodes
        initializers += more_inits
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, 1, k])],
                              outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as monolithic bundles run
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[16, 64, 256], metavar=("H", "K", "N"))
    ap.add_argument("--count", type=int, default=48, help="distinct products per graph (their bytes > L3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.02, args.shape).astype(np.float32) for _ in range(args.count)]
    q = rng.normal(0, 1, (1, args.shape[0], 1, args.shape[1])).astype(np.float32)
    reference = [np.matmul(q, w) for w in weights]
    sessions = {kind: session(kind, weights, args.threads) for kind in VARIANTS}
    micros: dict[str, list[float]] = {kind: [] for kind in VARIANTS}
    for _ in range(args.rounds):
        for kind, sess in sessions.items():
            for _ in range(3):
                sess.run(None, {"q": q})
            started = time.perf_counter()
            for _ in range(20):
                sess.run(None, {"q": q})
            micros[kind].append((time.perf_counter() - started) / 20 / args.count * 1e6)
    fp32_bytes = int(np.prod(args.shape)) * 4
    print(f"shape H,K,N = {tuple(args.shape)}, {args.count} products ({args.count * fp32_bytes / 2**20:.0f} MiB fp32), "
          f"{args.threads} threads")
    for kind, sess in sessions.items():
        got = sess.run(None, {"q": q})
        error = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, reference, strict=True))
        median = float(np.median(micros[kind]))
        print(f"{kind:12s} median {median:7.1f} µs per product (min {min(micros[kind]):.1f}), "
              f"fp32-equivalent {fp32_bytes / median / 1e3:5.1f} GB/s, max relative error {error:.1e}")


if __name__ == "__main__":
    main()
