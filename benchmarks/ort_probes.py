"""Small onnxruntime probes behind session 18's conclusions (issues 12 and 13), one per subcommand, one graph per
process, 2 threads with spinning unless told otherwise; medians of rounds.

    .venv/bin/python benchmarks/ort_probes.py dispatch          # µs one more tiny kernel adds to a session run
    .venv/bin/python benchmarks/ort_probes.py expert-inputs     # a V2-Lite expert, weights as initializers vs inputs
    .venv/bin/python benchmarks/ort_probes.py head-products     # MatMulIntegerToFloat, 3-D per-head B vs 2-D B
    .venv/bin/python benchmarks/ort_probes.py qmoe [--block 128] # QMoE's 4 of 32 experts vs MatMulNBits, same bytes

- dispatch: chains of 1 and 201 links on a [1, 1, 1024] tensor (Add, Reshape, or Reshape then Mul), no graph
  optimisation; the difference per kernel is the executor's cost of one more small node.
- expert-inputs: one V2-Lite routed expert (hidden 2048, intermediate 1408, int4 blocks of 128) as a QMoE of one
  expert and as MatMulNBits + SwiGLU + MatMulNBits, its weights constant initializers (prepacked at session
  creation) or graph inputs (what an offloaded expert fed from the file would be): session creation and run time.
- head-products: absorbed MLA's per-head int8 product (ds3bench ``w_uk`` 16 × 64 × 256 and ``w_uv`` 16 × 256 × 64)
  as today's MatMulIntegerToFloat over a 3-D B (onnxruntime does not prepack it: an initializer and an input cost
  the same), and as one 2-D B [K, H·N] that onnxruntime can prepack, at the price of every head against every
  head's matrix (H× the products) and a diagonal-block extraction (Reshape, Pad, Reshape, Slice).
- qmoe: a ds3bench MoE layer's routed experts (hidden 1024, 32 experts of 512, top 4, int4) as one QMoE with a
  fresh random choice per call, against the bytes of 4 experts as one MatMulNBits pair (fc1 4096 × 1024, fc2
  1024 × 2048): what QMoE's per-expert GEMVs cost over the same weights read as two large ones. onnxruntime's
  QMoE environment switches (ORT_QMOE_CPU_QNBIT_GEMM, ORT_USE_MLAS_Q4_GEMM_MOE, ...) apply when set around it.
"""

from __future__ import annotations

import argparse
import time

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


def session(blob: bytes, optimize: bool = True) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    start = time.perf_counter()
    sess = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return sess, (time.perf_counter() - start) * 1e3


def run_us(sess: ort.InferenceSession, feeds: dict, calls: int = 200, rounds: int = 5) -> float:
    for _ in range(min(calls, 50)):
        sess.run(None, feeds)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def value(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


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

    def codes(rows, cols):
        return RNG.integers(0, 256, (rows, cols // 2), dtype=np.uint8)

    def scales(*shape):
        return (RNG.random(shape, np.float32) + 0.5) * 1e-3

    def qmoe():
        w = {"c1": codes(2 * inter, hidden)[None], "s1": scales(1, 2 * inter, hidden // block),
             "c2": codes(hidden, inter)[None], "s2": scales(1, hidden, inter // block)}
        node = helper.make_node("QMoE", ["x", "p", "c1", "s1", "", "c2", "s2", *[""] * 7, "p"], ["y"],
                                domain="com.microsoft", k=1, activation_type="swiglu", swiglu_fusion=1,
                                expert_weight_bits=4, normalize_routing_weights=0, activation_alpha=1.0,
                                activation_beta=0.0, accuracy_level=4, block_size=block)
        return [node], [value("p", FLOAT, ["N", 1])], {"p": np.ones((1, 1), np.float32)}, w

    def matmuls():
        w = {}

        def product(name, n, k, a, y):
            w[name + ".q"] = codes(n, k).reshape(n, k // block, block // 2)
            w[name + ".s"] = scales(n * k // block)
            return helper.make_node("MatMulNBits", [a, name + ".q", name + ".s"], [y], domain="com.microsoft",
                                    K=k, N=n, bits=4, block_size=block, accuracy_level=4)

        nodes = [product("fc1", 2 * inter, hidden, "x", "h"),
                 helper.make_node("Split", ["h"], ["g", "u"], axis=-1, num_outputs=2),
                 helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
                 helper.make_node("Mul", ["silu", "u"], ["act"]), product("fc2", hidden, inter, "act", "y")]
        return nodes, [], {}, w

    for name, build in (("QMoE", qmoe), ("MatMulNBits", matmuls)):
        for where in ("initializers", "inputs"):
            nodes, extra_inputs, feeds, w = build()
            inputs = [value("x", FLOAT, ["N", hidden]), *extra_inputs]
            if where == "inputs":
                inputs += [value(n, UINT8 if a.dtype == np.uint8 else FLOAT, list(a.shape)) for n, a in w.items()]
                feeds, inits = {**feeds, **w}, {}
            else:
                inits = w
            sess, create_ms = session(model(nodes, inputs, [value("y", FLOAT, None)], inits))
            ms = run_us(sess, {"x": x, **feeds}, 50) / 1e3
            print(f"{name:12s} weights as {where:12s}: session {create_ms:5.1f} ms, a call {ms:.3f} ms")


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


def qmoe(block: int) -> None:
    hidden, inter, experts, k = 1024, 512, 32, 4
    x = RNG.standard_normal((1, hidden), np.float32)
    w = {"c1": RNG.integers(0, 256, (experts, 2 * inter, hidden // 2), dtype=np.uint8),
         "s1": (RNG.random((experts, 2 * inter, hidden // block), np.float32) + 0.5) * 1e-3,
         "c2": RNG.integers(0, 256, (experts, hidden, inter // 2), dtype=np.uint8),
         "s2": (RNG.random((experts, hidden, inter // block), np.float32) + 0.5) * 1e-3}
    node = helper.make_node("QMoE", ["x", "p", "c1", "s1", "", "c2", "s2", *[""] * 7, "w"], ["y"],
                            domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                            expert_weight_bits=4, normalize_routing_weights=1, activation_alpha=1.0,
                            activation_beta=0.0, accuracy_level=4, block_size=block)
    routing = [value(n, FLOAT, ["N", experts]) for n in ("p", "w")]
    moe = session(model([node], [value("x", FLOAT, ["N", hidden]), *routing], [value("y", FLOAT, None)], w))[0]

    def choice():
        probs = np.full((1, experts), -np.inf, np.float32)
        probs[0, RNG.choice(experts, k, replace=False)] = RNG.random(k)
        return {"x": x, "p": probs, "w": np.where(np.isinf(probs), 0, probs).astype(np.float32)}

    feeds = [choice() for _ in range(40)]
    for f in feeds * 3:
        moe.run(None, f)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for f in feeds * 10:
            moe.run(None, f)
        times.append((time.perf_counter() - start) / (len(feeds) * 10) * 1e6)

    def product(name, n, kk, a, y):
        inits[name + ".q"] = RNG.integers(0, 256, (n, kk // block, block // 2), dtype=np.uint8)
        inits[name + ".s"] = (RNG.random(n * kk // block, np.float32) + 0.5) * 1e-3
        return helper.make_node("MatMulNBits", [a, name + ".q", name + ".s"], [y], domain="com.microsoft",
                                K=kk, N=n, bits=4, block_size=block, accuracy_level=4)

    inits = {"z": np.array([0]), "half": np.array([k * inter]), "axis": np.array([1])}
    nodes = [product("fc1", 2 * inter * k, hidden, "x", "h"), helper.make_node("Slice", ["h", "z", "half", "axis"],
             ["h2"]), product("fc2", hidden, inter * k, "h2", "y")]
    pair = session(model(nodes, [value("x", FLOAT, ["N", hidden])], [value("y", FLOAT, None)], inits))[0]
    expert_bytes = k * 3 * inter * hidden * (0.5 + 4 / block)
    for label, us in (("QMoE, 4 of 32 experts", float(np.median(times))),
                      ("MatMulNBits pair, same bytes", run_us(pair, {"x": x}, 400, 7))):
        print(f"{label:30s} block {block}: {us:.1f} µs a call ({expert_bytes / us / 1e3:.1f} GB/s of weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["dispatch", "expert-inputs", "head-products", "qmoe"])
    parser.add_argument("--block", type=int, default=128, help="qmoe: the int4 block size")
    args = parser.parse_args()
    if args.probe == "qmoe":
        qmoe(args.block)
    else:
        {"dispatch": dispatch, "expert-inputs": expert_inputs, "head-products": head_products}[args.probe]()


if __name__ == "__main__":
    main()
