"""Small onnxruntime probes behind session 18's conclusions (issues 12 and 13), one per subcommand, one graph per
process, 2 threads with spinning unless told otherwise; medians of rounds.

    .venv/bin/python benchmarks/ort_probes.py dispatch          # µs one more tiny kernel adds to a session run
    .venv/bin/python benchmarks/ort_probes.py expert-inputs     # a V2-Lite expert, weights as initializers vs inputs
    .venv/bin/python benchmarks/ort_probes.py head-products     # MatMulIntegerToFloat, 3-D per-head B vs 2-D B
    .venv/bin/python benchmarks/ort_probes.py qmoe [--block 128] # QMoE's 4 of 32 experts vs MatMulNBits, same bytes
    .venv/bin/python benchmarks/ort_probes.py moe-kernel        # the prototype MoEInt4 kernel vs QMoE, same weights
    .venv/bin/python benchmarks/ort_probes.py kernel-agreement  # MatMulInt4 / MoEInt4 vs the stock ops and numpy
    .venv/bin/python benchmarks/ort_probes.py prefill [--tokens 512]  # MoEInt4 / MatMulInt4 vs the stock ops, T rows

- dispatch: chains of 1 and 201 links on a [1, 1, 1024] tensor (Add, Reshape, or Reshape then Mul), no graph
  optimisation; the difference per kernel is the executor's cost of one more small node.
- expert-inputs: one V2-Lite routed expert (hidden 2048, intermediate 1408, int4 blocks of 128) as a QMoE of one
  expert and as MatMulNBits + SwiGLU + MatMulNBits, its weights constant initializers (prepacked at session
  creation) or graph inputs (what an offloaded expert fed from the file would be): session creation and run time;
  and the prototype MoEInt4 (kernels/src/vnni_ops.c) both ways, and fed views of a memory-mapped file.
- head-products: absorbed MLA's per-head int8 product (ds3bench ``w_uk`` 16 × 64 × 256 and ``w_uv`` 16 × 256 × 64)
  as today's MatMulIntegerToFloat over a 3-D B (onnxruntime does not prepack it: an initializer and an input cost
  the same), and as one 2-D B [K, H·N] that onnxruntime can prepack, at the price of every head against every
  head's matrix (H× the products) and a diagonal-block extraction (Reshape, Pad, Reshape, Slice).
- qmoe: a ds3bench MoE layer's routed experts (hidden 1024, 32 experts of 512, top 4, int4) as one QMoE with a
  fresh random choice per call, against the bytes of 4 experts as one MatMulNBits pair (fc1 4096 × 1024, fc2
  1024 × 2048): what QMoE's per-expert GEMVs cost over the same weights read as two large ones. onnxruntime's
  QMoE environment switches (ORT_QMOE_CPU_QNBIT_GEMM, ORT_USE_MLAS_Q4_GEMM_MOE, ...) apply when set around it.
- moe-kernel: the same layer as QMoE and as the prototype MoEInt4 (weights as initializers and as inputs), each
  checked against fp32 numpy over the dequantized experts, then the MatMulNBits pair over the same bytes (timed).
  Its 26 MB of experts mostly sit in this VM's 32 MB L3, so this compares compute, not memory: step_split.py
  --custom times the kernels in a real step.
- kernel-agreement: MatMulInt4 and MoEInt4 (one token, and many grouped by expert) against MatMulNBits and QMoE
  and a float numpy transcription of both.
- prefill: T tokens (512 unless told) through a V2-Lite MoE layer's routed experts (hidden 2048, 64 experts of
  1408, top 6, int4 blocks of 128, a random choice per token) as QMoE and as MoEInt4, and through R1-Distill-
  Qwen-1.5B's gate/up and down products (K 1536 → N 17920, K 8960 → N 1536) as MatMulNBits and as MatMulInt4;
  stock and custom alternated per round, ms a call: the compute-bound side of the kernels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
FLOAT, UINT8, INT8 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8


def model(nodes, inputs, outputs, inits) -> bytes:
    initializers = [numpy_helper.from_array(a, n) for n, a in inits.items()]
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def session(blob: bytes, optimize: bool = True, library: Path | None = None) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    start = time.perf_counter()
    sess = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return sess, (time.perf_counter() - start) * 1e3


def run_us(sess: ort.InferenceSession, feeds: dict | list[dict], calls: int = 200, rounds: int = 5) -> float:
    """Median µs a call over ``rounds``; a list of feeds is cycled (a fresh expert choice per call)."""
    cycle = feeds if isinstance(feeds, list) else [feeds]
    for i in range(min(calls, 50)):
        sess.run(None, cycle[i % len(cycle)])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            sess.run(None, cycle[i % len(cycle)])
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def value(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def int4_codes(*shape) -> np.ndarray:
    """Random packed int4 codes (two per byte) for ``shape``'s last dim of weights."""
    return RNG.integers(0, 256, (*shape[:-1], shape[-1] // 2), dtype=np.uint8)


def block_scales(*shape) -> np.ndarray:
    return (RNG.random(shape, np.float32) + 0.5) * 1e-3


def int4_product(inits: dict, name: str, n: int, k: int, a: str, y: str, block: int):
    """A MatMulNBits y = a · Wᵀ over random int4 weights W [n, k] in blocks of ``block``, added to ``inits``."""
    inits[name + ".q"] = int4_codes(n, k).reshape(n, k // block, block // 2)
    inits[name + ".s"] = block_scales(n * k // block)
    return helper.make_node("MatMulNBits", [a, name + ".q", name + ".s"], [y], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)


def qmoe_node(k: int, block: int, weights: str, normalize: int):
    """QMoE over inputs c1/s1/c2/s2 (SwiGLU, gate/up interleaved, int4, accuracy level 4), as the export writes."""
    return helper.make_node("QMoE", ["x", "p", "c1", "s1", "", "c2", "s2", *[""] * 7, weights], ["y"],
                            domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                            expert_weight_bits=4, normalize_routing_weights=normalize, activation_alpha=1.0,
                            activation_beta=0.0, accuracy_level=4, block_size=block)


def dispatch() -> None:
    def chain(kind: str, n: int) -> bytes:
        nodes, inits, x = [], {}, "x"
        for i in range(n):
            if kind in ("Reshape", "Reshape+Mul"):
                inits[f"s{i}"] = np.array([1, 1024] if i % 2 else [1, 1, 1024], np.int64)
                nodes.append(helper.make_node("Reshape", [x, f"s{i}"], [f"r{i}"]))
                x = f"r{i}"
            if kind in ("Add", "Reshape+Mul"):
                inits[f"c{i}"] = np.full([1024], 1e-3 * i, np.float32)
                nodes.append(helper.make_node("Add" if kind == "Add" else "Mul", [x, f"c{i}"], [f"y{i}"]))
                x = f"y{i}"
        return model(nodes, [value("x", FLOAT, [1, 1, 1024])], [value(x, FLOAT, None)], inits)

    feeds = {"x": np.ones([1, 1, 1024], np.float32)}
    for kind in ("Add", "Reshape", "Reshape+Mul"):
        one, many = (run_us(session(chain(kind, n), optimize=False)[0], feeds, 500) for n in (1, 201))
        kernels = 400 if "+" in kind else 200  # the extra kernels of the 201-link chain
        print(f"{kind:12s} {(many - one) / kernels:.2f} µs per extra kernel (a chain of one link: {one:.1f} µs)")


def expert_inputs() -> None:
    hidden, inter, block = 2048, 1408, 128
    x = RNG.standard_normal((1, hidden), np.float32)

    def qmoe():
        w = {"c1": int4_codes(1, 2 * inter, hidden), "s1": block_scales(1, 2 * inter, hidden // block),
             "c2": int4_codes(1, hidden, inter), "s2": block_scales(1, hidden, inter // block)}
        return [qmoe_node(1, block, "p", 0)], [value("p", FLOAT, ["N", 1])], {"p": np.ones((1, 1), np.float32)}, w

    def matmuls():
        w = {}
        nodes = [int4_product(w, "fc1", 2 * inter, hidden, "x", "h", block),
                 helper.make_node("Split", ["h"], ["g", "u"], axis=-1, num_outputs=2),
                 helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
                 helper.make_node("Mul", ["silu", "u"], ["act"]),
                 int4_product(w, "fc2", hidden, inter, "act", "y", block)]
        return nodes, [], {}, w

    def custom():
        nodes, extra_inputs, feeds, w = qmoe()
        node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "p"], ["y"], domain="com.dsedge",
                                k=1, block_size=block, normalize_routing_weights=0)
        return [node], extra_inputs, feeds, w

    library = build_custom_ops()
    for name, build in (("QMoE", qmoe), ("MatMulNBits", matmuls), ("MoEInt4", custom)):
        for where in ("initializers", "inputs"):
            nodes, extra_inputs, feeds, w = build()
            inputs = [value("x", FLOAT, ["N", hidden]), *extra_inputs]
            if where == "inputs":
                inputs += [value(n, UINT8 if a.dtype == np.uint8 else FLOAT, list(a.shape)) for n, a in w.items()]
                feeds, inits = {**feeds, **w}, {}
            else:
                inits = w
            sess, create_ms = session(model(nodes, inputs, [value("y", FLOAT, None)], inits),
                                      library=library if name == "MoEInt4" else None)
            ms = run_us(sess, {"x": x, **feeds}, 50) / 1e3
            print(f"{name:12s} weights as {where:12s}: session {create_ms:5.1f} ms, a call {ms:.3f} ms")
            if name == "MoEInt4" and where == "inputs":
                print(f"{name:12s} weights as inputs, 16 experts cycled from a memory-mapped file (page cache): "
                      f"a call {mapped_experts_us(sess, x, feeds, w) / 1e3:.3f} ms")
            del sess


def mapped_experts_us(sess: ort.InferenceSession, x: np.ndarray, feeds: dict, w: dict, experts: int = 16) -> float:
    """µs a call when each call's expert weights are numpy views of a file in the page cache (np.memmap), a fresh
    expert per call out of ``experts``: what an offloaded expert fed straight from its partition file costs."""
    path = Path(tempfile.mkdtemp(prefix="dsedge-experts-")) / "experts.bin"
    expert_bytes = sum(a.nbytes for a in w.values())
    with path.open("wb") as f:
        for _ in range(experts):
            for a in w.values():
                f.write(RNG.permutation(a.reshape(-1)).tobytes())
    mapped = np.memmap(path, np.uint8, "r")
    cycle = []
    for e in range(experts):
        views, at = {}, e * expert_bytes
        for n, a in w.items():
            views[n] = mapped[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
            at += a.nbytes
        cycle.append({"x": x, **feeds, **views})
    us = run_us(sess, cycle, 64)
    del cycle, mapped
    path.unlink()
    return us


def head_products() -> None:
    for heads, k, n in ((16, 64, 256), (16, 256, 64)):
        w = RNG.integers(-127, 128, (heads, k, n), dtype=np.int8)
        col_scales = RNG.random((heads, 1, n), np.float32)
        a = RNG.integers(0, 256, (1, heads, 1, k), dtype=np.uint8)
        feeds = {"a": a, "as": np.array(0.01, np.float32)}
        inputs = [value("a", UINT8, [1, heads, 1, k]), value("as", FLOAT, [])]
        zero = {"az": np.array(128, np.uint8)}
        batched = model([helper.make_node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "az"], ["y"],
                                          domain="com.microsoft")], inputs, [value("y", FLOAT, None)],
                        {"b": w, "bs": col_scales, **zero})
        as_input = model([helper.make_node("MatMulIntegerToFloat", ["a", "b", "as", "bs", "az"], ["y"],
                                           domain="com.microsoft")], [*inputs, value("b", INT8, [heads, k, n])],
                         [value("y", FLOAT, None)], {"bs": col_scales, **zero})
        shapes = {"rows": [1, heads, k], "flat": [1, heads * heads * n], "pads": [0, 0, 0, heads * n],
                  "blocks": [1, heads, (heads + 1) * n], "z": [0], "n": [n], "last": [-1], "out": [1, heads, 1, n]}
        flat = model([helper.make_node("Reshape", ["a", "rows"], ["a2"]),
                      helper.make_node("MatMulIntegerToFloat", ["a2", "b", "as", "bs", "az"], ["y"],
                                       domain="com.microsoft"),  # [1, H, H·N]: every head × every matrix
                      helper.make_node("Reshape", ["y", "flat"], ["yf"]),
                      helper.make_node("Pad", ["yf", "pads"], ["yp"]),
                      helper.make_node("Reshape", ["yp", "blocks"], ["yb"]),  # row h's own block now starts it
                      helper.make_node("Slice", ["yb", "z", "n", "last"], ["yd"]),
                      helper.make_node("Reshape", ["yd", "out"], ["o"])], inputs, [value("o", FLOAT, None)],
                     {"b": np.ascontiguousarray(w.transpose(1, 0, 2).reshape(k, heads * n)),
                      "bs": col_scales.reshape(heads * n), **zero,
                      **{name: np.array(v, np.int64) for name, v in shapes.items()}})
        want = np.einsum("hk,hkn->hn", a[0, :, 0].astype(np.int32) - 128, w.astype(np.int32)) * 0.01 * col_scales[:, 0]
        got = session(flat)[0].run(None, feeds)[0][0, :, 0]
        assert np.allclose(got, want, rtol=1e-5, atol=1e-3), "diagonal-block extraction is wrong"
        times = {label: run_us(session(blob)[0], feeds if label != "3-D B as input" else {**feeds, "b": w}, 500)
                 for label, blob in (("3-D B", batched), ("3-D B as input", as_input), ("2-D B + diagonal", flat))}
        print(f"H {heads} K {k} N {n}: " + ", ".join(f"{label} {us:.1f} µs" for label, us in times.items()))


def layer_weights(experts: int, hidden: int, inter: int, block: int) -> dict[str, np.ndarray]:
    """A MoE layer's routed experts in QMoE's stored layout: random int4 codes and block scales."""
    return {"c1": int4_codes(experts, 2 * inter, hidden), "s1": block_scales(experts, 2 * inter, hidden // block),
            "c2": int4_codes(experts, hidden, inter), "s2": block_scales(experts, hidden, inter // block)}


def qmoe(block: int) -> None:
    hidden, inter, experts, k = 1024, 512, 32, 4
    x = RNG.standard_normal((1, hidden), np.float32)
    w = layer_weights(experts, hidden, inter, block)
    routing = [value(n, FLOAT, ["N", experts]) for n in ("p", "w")]
    moe = session(model([qmoe_node(k, block, "w", 1)], [value("x", FLOAT, ["N", hidden]), *routing],
                        [value("y", FLOAT, None)], w))[0]
    moe_us = run_us(moe, [qmoe_choice(x, experts, k) for _ in range(40)], 400, 7)
    del moe  # one spinning session at a time: several slow each other down
    expert_bytes = k * 3 * inter * hidden * (0.5 + 4 / block)
    for label, us in (("QMoE, 4 of 32 experts", moe_us),
                      ("MatMulNBits pair, same bytes", pair_us(x, hidden, inter, k, block))):
        print(f"{label:30s} block {block}: {us:.1f} µs a call ({expert_bytes / us / 1e3:.1f} GB/s of weights)")


KERNEL = Path(__file__).resolve().parents[1] / "kernels" / "src" / "vnni_ops.c"  # what dsedge-kernels ships


def build_custom_ops() -> Path:
    """kernels/src/vnni_ops.c as a shared library for this CPU (a build directory under /tmp); the target flags
    from DSEDGE_KERNEL_CFLAGS (default -march=native; "-mavx2 -mfma" builds MoEInt4's AVX2 path)."""
    library = Path(tempfile.mkdtemp(prefix="dsedge-vnni-ops-")) / "vnni_ops.so"
    flags = os.environ.get("DSEDGE_KERNEL_CFLAGS", "-march=native").split()
    subprocess.run(["gcc", "-O3", *flags, "-fPIC", "-shared", "-o", str(library), str(KERNEL), "-lm"], check=True)
    return library


def dequantized(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., n, k/2] packed codes (low nibble first) and [..., n, k/B] scales → float [..., n, k]."""
    q = np.stack([codes & 15, codes >> 4], -1).reshape(*codes.shape[:-1], -1).astype(np.float32) - 8
    return q * np.repeat(scales, q.shape[-1] // scales.shape[-1], -1)


def moe_reference(x, chosen, weights, w) -> np.ndarray:
    """fp32 numpy over the dequantized experts: Σ weight · fc2(silu(gate) · up), gate/up rows interleaved."""
    y = np.zeros_like(x)
    for e, wt in zip(chosen, weights, strict=True):
        gate_up = x @ dequantized(w["c1"][e], w["s1"][e]).T
        h = gate_up[:, 0::2] / (1 + np.exp(-gate_up[:, 0::2])) * gate_up[:, 1::2]
        y += wt * (h @ dequantized(w["c2"][e], w["s2"][e]).T)
    return y


def moe_kernel(block: int) -> None:
    """The prototype kernel against QMoE and a MatMulNBits pair over the same weights (see kernels/src/vnni_ops.c)."""
    hidden, inter, experts, k = 1024, 512, 32, 4
    library = build_custom_ops()
    x = RNG.standard_normal((1, hidden), np.float32)
    w = layer_weights(experts, hidden, inter, block)
    routing = [value(n, FLOAT, ["N", experts]) for n in ("p", "w")]
    choices = [qmoe_choice(x, experts, k) for _ in range(40)]
    custom = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "w"], ["y"], domain="com.dsedge",
                              k=k, block_size=block, normalize_routing_weights=1)
    blobs = {"QMoE": (model([qmoe_node(k, block, "w", 1)], [value("x", FLOAT, ["N", hidden]), *routing],
                            [value("y", FLOAT, None)], w), None),
             "MoEInt4": (custom_model(custom, hidden, routing, w, as_inputs=False), library),
             "MoEInt4, weights as inputs": (custom_model(custom, hidden, routing, w, as_inputs=True), library)}
    feeds = {"MoEInt4, weights as inputs": [{**c, **w} for c in choices]}
    check = choices[0]
    chosen = np.flatnonzero(check["w"][0])
    ref = moe_reference(x, chosen, check["w"][0, chosen] / check["w"][0, chosen].sum(), w)
    expert_bytes = k * 3 * inter * hidden * (0.5 + 4 / block)
    for label, (blob, lib) in blobs.items():
        sess = session(blob, library=lib)[0]
        got = sess.run(None, feeds.get(label, choices)[0])[0]
        us = run_us(sess, feeds.get(label, choices), 400, 7)
        error = float(np.abs(got - ref).max() / np.abs(ref).max())
        print(f"{label:30s} block {block}: {us:.1f} µs a call ({expert_bytes / us / 1e3:.1f} GB/s of weights), "
              f"max error / max |y| against fp32 numpy {error:.2e}")
        del sess  # one spinning session at a time
    print(f"{'MatMulNBits pair, same bytes':30s} block {block}: {pair_us(x, hidden, inter, k, block):.1f} µs a call")


def custom_model(node, hidden: int, routing: list, w: dict, as_inputs: bool) -> bytes:
    shapes = {n: [value(n, UINT8 if n[0] == "c" else FLOAT, list(a.shape))] for n, a in w.items()}
    inputs = [value("x", FLOAT, ["N", hidden]), *routing, *(sum(shapes.values(), []) if as_inputs else [])]
    return model([node], inputs, [value("y", FLOAT, None)], {} if as_inputs else w)


def qmoe_choice(x: np.ndarray, experts: int, k: int) -> dict:
    """A fresh random choice of k experts for each row of x: probs −inf elsewhere, weights 0 elsewhere."""
    probs = np.full((len(x), experts), -np.inf, np.float32)
    for row in probs:
        row[RNG.choice(experts, k, replace=False)] = RNG.random(k)
    return {"x": x, "p": probs, "w": np.where(np.isinf(probs), 0, probs).astype(np.float32)}


def kernel_agreement() -> None:
    """The prototype kernels against the stock ops they replace and a float numpy transcription of both (the
    weights dequantized, the activations in fp32), max |difference| per case: MatMulInt4 vs MatMulNBits over
    [1, T, K] inputs, MoEInt4 (one token, and T tokens grouped by expert) vs QMoE with a fresh choice per token."""
    library = build_custom_ops()
    for k, n in ((1024, 672), (2816, 1024), (8960, 1536)):
        inits = {}
        stock_node = int4_product(inits, "w", n, k, "x", "y", 128)
        custom_node = helper.make_node("MatMulInt4", ["x", "w.q", "w.s"], ["y"], domain="com.dsedge", K=k, N=n,
                                       block_size=128)
        io = ([value("x", FLOAT, [1, "T", k])], [value("y", FLOAT, None)])
        stock = session(model([stock_node], *io, inits))[0]
        custom = session(model([custom_node], *io, inits), library=library)[0]
        weights = dequantized(inits["w.q"].reshape(n, k // 2), inits["w.s"].reshape(n, k // 128))
        for t in (1, 2, 7, 8, 33, 512):
            x = RNG.standard_normal((1, t, k), np.float32)
            a, b, ref = stock.run(None, {"x": x})[0], custom.run(None, {"x": x})[0], x @ weights.T
            print(f"MatMulInt4 K {k} N {n} T {t:3d}: vs MatMulNBits {np.abs(a - b).max():.1e}, vs fp32 numpy "
                  f"{np.abs(b - ref).max():.1e} (MatMulNBits {np.abs(a - ref).max():.1e}, "
                  f"|y| up to {np.abs(ref).max():.2f})")
    hidden, inter, experts, k = 1024, 512, 32, 4
    w = layer_weights(experts, hidden, inter, 128)
    routing = [value(n, FLOAT, ["N", experts]) for n in ("p", "w")]
    stock = session(model([qmoe_node(k, 128, "w", 1)], [value("x", FLOAT, ["N", hidden]), *routing],
                          [value("y", FLOAT, None)], w))[0]
    node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "w"], ["y"], domain="com.dsedge",
                            k=k, block_size=128, normalize_routing_weights=1)
    custom = session(custom_model(node, hidden, routing, w, as_inputs=False), library=library)[0]
    for t in (1, 2, 3, 8, 64):
        feeds = qmoe_choice(RNG.standard_normal((t, hidden), np.float32), experts, k)
        a, b = stock.run(None, feeds)[0], custom.run(None, feeds)[0]
        ref = np.concatenate([moe_reference(feeds["x"][i:i + 1], np.flatnonzero(row), row[row > 0] / row.sum(), w)
                              for i, row in enumerate(feeds["w"])])
        print(f"MoEInt4 T {t:2d}: vs QMoE {np.abs(a - b).max():.1e}, vs fp32 numpy {np.abs(b - ref).max():.1e} "
              f"(QMoE {np.abs(a - ref).max():.1e}, |y| up to {np.abs(ref).max():.1e})")


def prefill(tokens: int, rounds: int = 5) -> None:
    """The kernels' many-token path against the stock ops, the same weights, alternated per round."""
    library = build_custom_ops()
    hidden, inter, experts, k = 2048, 1408, 64, 6
    w = layer_weights(experts, hidden, inter, 128)
    routing = [value(n, FLOAT, ["N", experts]) for n in ("p", "w")]
    node = helper.make_node("MoEInt4", ["x", "p", "c1", "s1", "c2", "s2", "w"], ["y"], domain="com.dsedge",
                            k=k, block_size=128, normalize_routing_weights=1)
    cases = {"MoE V2-Lite layer": (
        model([qmoe_node(k, 128, "w", 1)], [value("x", FLOAT, ["N", hidden]), *routing], [value("y", FLOAT, None)], w),
        custom_model(node, hidden, routing, w, as_inputs=False),
        qmoe_choice(RNG.standard_normal((tokens, hidden), np.float32), experts, k))}
    for k_in, n in ((1536, 17920), (8960, 1536)):
        inits = {}
        stock_node = int4_product(inits, "w", n, k_in, "x", "y", 128)
        custom_node = helper.make_node("MatMulInt4", ["x", "w.q", "w.s"], ["y"], domain="com.dsedge", K=k_in, N=n,
                                       block_size=128)
        io = ([value("x", FLOAT, [1, "T", k_in])], [value("y", FLOAT, None)])
        cases[f"dense K {k_in} N {n}"] = (model([stock_node], *io, inits), model([custom_node], *io, inits),
                                          {"x": RNG.standard_normal((1, tokens, k_in), np.float32)})
    for label, (stock_blob, custom_blob, feeds) in cases.items():
        times = {"stock": [], "custom": []}
        for _ in range(rounds):
            for kind, blob, lib in (("stock", stock_blob, None), ("custom", custom_blob, library)):
                sess = session(blob, library=lib)[0]
                times[kind].append(run_us(sess, feeds, 3, 1) / 1e3)
                del sess  # one spinning session at a time
        stock, custom = (float(np.median(times[kind])) for kind in ("stock", "custom"))
        rounds_text = " ".join(f"{s / c:.2f}" for s, c in zip(*times.values(), strict=True))
        print(f"{label:26s} T {tokens}: stock {stock:7.1f} ms, custom {custom:7.1f} ms (custom is "
              f"{stock / custom:.2f}x the stock speed; per round {rounds_text})")


def pair_us(x: np.ndarray, hidden: int, inter: int, k: int, block: int) -> float:
    """k experts' bytes as one MatMulNBits pair (fc1 2·I·k × H, fc2 H × I·k): what the same bytes cost as two
    large GEMVs."""
    inits = {"z": np.array([0]), "half": np.array([k * inter]), "axis": np.array([1])}
    nodes = [int4_product(inits, "fc1", 2 * inter * k, hidden, "x", "h", block),
             helper.make_node("Slice", ["h", "z", "half", "axis"], ["h2"]),
             int4_product(inits, "fc2", hidden, inter * k, "h2", "y", block)]
    pair = session(model(nodes, [value("x", FLOAT, ["N", hidden])], [value("y", FLOAT, None)], inits))[0]
    return run_us(pair, {"x": x}, 400, 7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["dispatch", "expert-inputs", "head-products", "qmoe", "moe-kernel",
                                          "kernel-agreement", "prefill"])
    parser.add_argument("--block", type=int, default=128, help="qmoe: the int4 block size")
    parser.add_argument("--tokens", type=int, default=512, help="prefill: the rows of activations")
    args = parser.parse_args()
    if args.probe == "prefill":
        prefill(args.tokens)
    elif args.probe in ("qmoe", "moe-kernel"):
        (qmoe if args.probe == "qmoe" else moe_kernel)(args.block)
    else:
        {"dispatch": dispatch, "expert-inputs": expert_inputs, "head-products": head_products,
         "kernel-agreement": kernel_agreement}[args.probe]()


if __name__ == "__main__":
    main()
