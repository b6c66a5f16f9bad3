"""Absorbed MLA's per-head products at lower precision, with the stock onnxruntime ops that can express them.

Absorbed MLA multiplies the query by ``w_uk`` and the attention output by ``w_uv`` head by head
(``[B, H, T, K] @ [H, K, N]``); export stored both fp32 until 2026-12-07 (ds3bench: 16.8 MB of a 95 MB int4
step), and now ships ``int8-rowq`` in quantized fp32 exports: each row quantized to uint8 by its own max
(blocked ``QuantizeLinear``, one block per row) times int8 weights in ``MatMulIntegerToFloat``. MatMulNBits
takes one 2-D matrix, so a quantized per-head product has to be one of: fp16 weights cast to fp32 before an
fp32 MatMul, an fp16 MatMul, int8 weights in ``DynamicQuantizeMatMul`` (a batched B with per-head, per-column
scales runs on CPU; ``int8-dqmm-head`` first scales each head's row to max |q| = 1, so one activation scale
fits every head), or every head's matrix stacked into one MatMulNBits applied to all H query rows (each byte
read once, H× the multiply-adds; ``nbits8-stacked``/``nbits4-stacked``); ``custom-int8`` is the prototype
custom op of ``benchmarks/kernels/head_matmul.c`` (int8 weights, one scale per head and column, fp32
activations; built here with gcc and registered with ``register_custom_ops_library``). Each variant is a
graph of ``--count`` distinct products (more bytes than the L3 cache, so that they are read from memory as in a
decode step), timed in interleaved rounds in one process.

    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 64 256 --count 48     # ds3bench w_uk
    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 256 64 --count 48     # ds3bench w_uv
    .venv/bin/python benchmarks/mla_products_bench.py --shape 16 128 512 --count 16    # V2-Lite w_uk
    .venv/bin/python benchmarks/mla_products_bench.py --variants fp32 custom-int8 --threads 1 2
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dsedge.export.quantized import int8_per_column  # what export writes

VARIANTS = ("fp32", "fp16-cast", "fp16-matmul", "int8-dqmm", "int8-dqmm-head", "int8-rowq", "int8-rowq-s8",
            "int8-rowq-u8", "int8-rowq-w7", "nbits8-stacked", "nbits4-stacked", "custom-int8")
KERNEL = Path(__file__).resolve().parent / "kernels" / "head_matmul.c"
OUT = Path(__file__).resolve().parent / "out"


def custom_library() -> Path:
    """The prototype kernel as a shared library (rebuilt when the source is newer)."""
    library = OUT / "head_matmul.so"
    if not library.exists() or library.stat().st_mtime < KERNEL.stat().st_mtime:
        OUT.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O3", "-march=native", "-fPIC", "-shared", "-o", str(library), str(KERNEL)], check=True)
    return library


def _stacked_nbits(i: int, weight: np.ndarray, bits: int) -> tuple[list, list]:
    """Every head's matrix stacked into one MatMulNBits ``B`` [H·N, K] (block 32, symmetric RTN), applied to
    the H query rows at once (M = H): each weight byte is read once, at the price of H× the multiply-adds
    (head h's row times every head's matrix); head h's own result is the diagonal block, taken by GatherND."""
    heads, k, n = weight.shape
    y, w = f"y{i}", f"w{i}"
    stacked = np.ascontiguousarray(weight.transpose(0, 2, 1).reshape(heads * n, k))  # [H·N, K]: rows = outputs
    block, top = 32, (1 << (bits - 1)) - 1
    groups = stacked.reshape(heads * n, k // block, block)
    scale = np.abs(groups).max(axis=2, keepdims=True) / top
    codes = np.clip(np.round(groups / scale), -top - 1, top).astype(np.int16) + (top + 1)  # unsigned, zero = 2^(b-1)
    codes = codes.astype(np.uint8).reshape(heads * n, k // block, block)
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    diagonal = np.stack([np.arange(heads), np.arange(heads)], axis=1).astype(np.int64)  # [H, 2]
    nodes = [helper.make_node("MatMulNBits", ["q2d", w, w + "_s"], [y + "_all"], domain="com.microsoft", K=k,
                              N=heads * n, bits=bits, block_size=block, accuracy_level=4),
             helper.make_node("Reshape", [y + "_all", "hhn" + str(n)], [y + "_hhn"]),
             helper.make_node("GatherND", [y + "_hhn", "diag"], [y])]  # [H, N]
    inits = [numpy_helper.from_array(packed, w),
             numpy_helper.from_array(scale.reshape(-1).astype(np.float32), w + "_s"),
             numpy_helper.from_array(np.array([heads, heads, n], np.int64), "hhn" + str(n)),
             numpy_helper.from_array(diagonal, "diag")]
    return nodes, inits


def product_nodes(kind: str, i: int, weight: np.ndarray) -> tuple[list, list]:
    """Nodes and initializers computing ``y{i} = q @ weight`` in the variant's precision."""
    y, w = f"y{i}", f"w{i}"
    if kind == "fp32":
        return [helper.make_node("MatMul", ["q", w], [y])], [numpy_helper.from_array(weight, w)]
    if kind.startswith("nbits"):
        return _stacked_nbits(i, weight, int(kind[5]))
    if kind == "custom-int8":
        codes, scale = int8_per_column(weight)  # the op takes its scales as [H, N]
        return ([helper.make_node("HeadMatMulInt8", ["q", w, w + "_s"], [y], domain="com.dsedge.bench")],
                [numpy_helper.from_array(codes, w), numpy_helper.from_array(scale[:, 0, :], w + "_s")])
    if kind == "fp16-cast":
        return ([helper.make_node("Cast", [w], [w + "_f"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["q", w + "_f"], [y])],
                [numpy_helper.from_array(weight.astype(np.float16), w)])
    if kind == "fp16-matmul":  # "q16" is cast once for every product
        return ([helper.make_node("MatMul", ["q16", w], [y + "_h"]),
                 helper.make_node("Cast", [y + "_h"], [y], to=TensorProto.FLOAT)],
                [numpy_helper.from_array(weight.astype(np.float16), w)])
    codes, scale = int8_per_column(weight, 63 if kind.endswith("-w7") else 127)
    if kind.startswith("int8-rowq"):  # each row quantized by its own max (export.attention)
        signed = kind.endswith("-s8")  # int8 codes, no zero point: onnxruntime's int8 x int8 path
        zero = [] if signed else ["zp128"]
        if kind.endswith("-u8"):  # uint8 weights around 128 as well: the u8 x u8 path, which widens to int16
            codes, zero = (codes.astype(np.int16) + 128).astype(np.uint8), ["zp128", "zp128"]
        quantize = (helper.make_node("QuantizeLinear", ["q", y + "_s"], [y + "_q"], axis=-1, block_size=weight.shape[1],
                                     output_dtype=TensorProto.INT8) if signed else
                    helper.make_node("QuantizeLinear", ["q", y + "_s", "zp_rows"], [y + "_q"], axis=-1,
                                     block_size=weight.shape[1]))
        nodes = [helper.make_node("Abs", ["q"], [y + "_abs"]),
                 helper.make_node("ReduceMax", [y + "_abs", "last_axis"], [y + "_max"], keepdims=1),
                 helper.make_node("Mul", [y + "_max", "inv127"], [y + "_s"]), quantize,
                 helper.make_node("MatMulIntegerToFloat", [y + "_q", w, "one", w + "_s", *zero],
                                  [y + "_n"], domain="com.microsoft"),
                 helper.make_node("Mul", [y + "_n", y + "_s"], [y])]
        return nodes, [numpy_helper.from_array(codes, w), numpy_helper.from_array(scale, w + "_s"),
                       numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
                       numpy_helper.from_array(np.array(1 / 127, np.float32), "inv127"),
                       numpy_helper.from_array(np.array(1, np.float32), "one"),
                       numpy_helper.from_array(np.array(128, np.uint8), "zp128"),
                       numpy_helper.from_array(np.full((1, weight.shape[0], 1, 1), 128, np.uint8), "zp_rows")]
    if kind == "int8-dqmm-head":  # each head's row scaled to max |q| = 1 first: one activation scale fits all
        nodes = [helper.make_node("Abs", ["q"], [y + "_abs"]),
                 helper.make_node("ReduceMax", [y + "_abs", "last_axis"], [y + "_max"], keepdims=1),
                 helper.make_node("Max", [y + "_max", "tiny"], [y + "_amax"]),
                 helper.make_node("Div", ["q", y + "_amax"], [y + "_qn"]),
                 helper.make_node("DynamicQuantizeMatMul", [y + "_qn", w, w + "_s"], [y + "_n"],
                                  domain="com.microsoft"),
                 helper.make_node("Mul", [y + "_n", y + "_amax"], [y])]
        return nodes, [numpy_helper.from_array(codes, w), numpy_helper.from_array(scale, w + "_s"),
                       numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
                       numpy_helper.from_array(np.array(1e-30, np.float32), "tiny")]
    return ([helper.make_node("DynamicQuantizeMatMul", ["q", w, w + "_s"], [y], domain="com.microsoft")],
            [numpy_helper.from_array(codes, w), numpy_helper.from_array(scale, w + "_s")])


def session(kind: str, weights: list[np.ndarray], threads: int) -> ort.InferenceSession:
    heads, k, _ = weights[0].shape
    nodes = [helper.make_node("Cast", ["q"], ["q16"], to=TensorProto.FLOAT16)] if kind == "fp16-matmul" else []
    initializers, outputs = [], []
    if kind.startswith("nbits"):  # the H query rows as M = H rows of one 2-D input
        nodes.append(helper.make_node("Reshape", ["q", "hk"], ["q2d"]))
        initializers.append(numpy_helper.from_array(np.array([heads, k], np.int64), "hk"))
    for i, weight in enumerate(weights):
        more_nodes, more_inits = product_nodes(kind, i, weight)
        nodes += more_nodes
        names = {t.name for t in initializers}
        initializers += [t for t in more_inits if t.name not in names]  # shared shapes/indices once
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, 1, k])],
                              outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid("com.dsedge.bench", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    if kind == "custom-int8":
        options.register_custom_ops_library(str(custom_library()))
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as monolithic bundles run
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=3, type=int, default=[16, 64, 256], metavar=("H", "K", "N"))
    ap.add_argument("--count", type=int, default=48, help="distinct products per graph (their bytes > L3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="intra-op threads (each a cell)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.02, args.shape).astype(np.float32) for _ in range(args.count)]
    q = rng.normal(0, 1, (1, args.shape[0], 1, args.shape[1])).astype(np.float32)
    reference = [np.matmul(q, w) for w in weights]
    sessions = {(kind, threads): session(kind, weights, threads) for kind in args.variants for threads in args.threads}
    micros: dict[tuple, list[float]] = {cell: [] for cell in sessions}
    for _ in range(args.rounds):
        for cell, sess in sessions.items():
            for _ in range(3):
                sess.run(None, {"q": q})
            started = time.perf_counter()
            for _ in range(20):
                sess.run(None, {"q": q})
            micros[cell].append((time.perf_counter() - started) / 20 / args.count * 1e6)
    fp32_bytes = int(np.prod(args.shape)) * 4
    print(f"shape H,K,N = {tuple(args.shape)}, {args.count} products ({args.count * fp32_bytes / 2**20:.0f} MiB fp32)")
    for (kind, threads), sess in sessions.items():
        got = sess.run(None, {"q": q})
        error = max(float(np.abs(g.reshape(r.shape) - r).max() / np.abs(r).max())
                    for g, r in zip(got, reference, strict=True))
        median = float(np.median(micros[kind, threads]))
        print(f"{kind:14s} {threads} threads: median {median:7.1f} µs per product "
              f"(min {min(micros[kind, threads]):.1f}), fp32-equivalent {fp32_bytes / median / 1e3:5.1f} GB/s, "
              f"max relative error {error:.1e}")


if __name__ == "__main__":
    main()
