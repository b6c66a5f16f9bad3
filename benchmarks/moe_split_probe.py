"""Probe of onnxruntime's MoE ops at decode on a ds3bench-shaped layer (hidden 1024, 32 experts of 512, top 4):
each expert stored as S slices of its intermediate units (slice s at slot s·E + e, k·S chosen), which the export
does for float experts (dsedge/export/moe.py ``MOE_OP_SPLIT``). Same weights for every S: the outputs are checked
against S = 1. ``fp32`` (com.microsoft::MoE; also a plain-MatMul baseline over the same bytes), ``int4`` / ``int8``
(QMoE, block 128). Several sessions with spinning pools in one process distort each other: run one S per process.

    for s in 1 2 1 2; do .venv/bin/python benchmarks/moe_split_probe.py fp32 2 1 $s | grep median; done
    .venv/bin/python benchmarks/moe_split_probe.py int4 2 1 1,2      # args: kind threads tokens S-list
"""

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

H, I, E, K = 1024, 512, 32, 4
rng = np.random.default_rng(0)
NEG = float("-inf")


def model(node, inits, n_exp):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])
    p = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", n_exp])
    wts = helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", n_exp])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])
    g = helper.make_graph([node], "g", [x, p, wts], [y], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


gate = rng.standard_normal((E, I, H), np.float32) * 0.02
up = rng.standard_normal((E, I, H), np.float32) * 0.02
down = rng.standard_normal((E, H, I), np.float32) * 0.02


def fp32_moe(S):
    def sub(e, s):
        sl = slice(s * I // S, (s + 1) * I // S)
        fc1 = np.stack([gate[e, sl], up[e, sl]], 1).reshape(-1, H)
        return fc1, down[e][:, sl] * S

    fc1 = np.stack([sub(e, s)[0] for s in range(S) for e in range(E)])
    fc2 = np.stack([sub(e, s)[1] for s in range(S) for e in range(E)])
    node = helper.make_node(
        "MoE",
        ["x", "p", "fc1", "", "fc2"],
        ["y"],
        domain="com.microsoft",
        k=K * S,
        activation_type="swiglu",
        swiglu_fusion=1,
        normalize_routing_weights=1,
        activation_alpha=1.0,
        activation_beta=0.0,
    )
    return model(node, {"fc1": fc1, "fc2": fc2}, E * S), lambda probs, wts: {
        "p": np.tile(probs, (1, S)),
        "w": np.tile(wts, (1, S)),
    }


Q = {}


def int4_moe(S, bits=4, block=128):
    per = 8 // bits
    if bits not in Q:
        Q[bits] = (
            rng.integers(0, 256, (E, 2 * I, H // per), dtype=np.uint8),
            (rng.random((E, 2 * I, H // block), np.float32) + 0.5) * 1e-3,
            rng.integers(0, 256, (E, H, I // per), dtype=np.uint8),
            (rng.random((E, H, I // block), np.float32) + 0.5) * 1e-3,
        )
    c1, s1, c2, s2 = Q[bits]

    def sub(e, s):
        rows = slice(2 * s * I // S, 2 * (s + 1) * I // S)  # interleaved gate/up pairs of the s-th part
        cols = slice(s * I // S // per, (s + 1) * I // S // per)
        blk = slice(s * I // S // block, (s + 1) * I // S // block)
        return c1[e, rows], s1[e, rows], c2[e][:, cols], s2[e][:, blk] * S

    parts = [sub(e, s) for s in range(S) for e in range(E)]
    inits = {n: np.ascontiguousarray(np.stack([p[i] for p in parts])) for i, n in enumerate(["c1", "s1", "c2", "s2"])}
    node = helper.make_node(
        "QMoE",
        ["x", "p", "c1", "s1", "", "c2", "s2", "", "", "", "", "", "", "", "w"],
        ["y"],
        domain="com.microsoft",
        k=K * S,
        activation_type="swiglu",
        swiglu_fusion=1,
        expert_weight_bits=bits,
        normalize_routing_weights=1,
        activation_alpha=1.0,
        activation_beta=0.0,
        accuracy_level=4,
        block_size=block,
    )
    return model(node, inits, E * S), lambda probs, wts: {"p": np.tile(probs, (1, S)), "w": np.tile(wts, (1, S))}


def routing(n):
    scores = rng.random((n, E), np.float32)
    probs = np.full((n, E), NEG, np.float32)
    for r in range(n):
        ch = rng.choice(E, K, replace=False)
        probs[r, ch] = scores[r, ch]
    return probs, scores


def session(blob, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(blob, o, providers=["CPUExecutionProvider"])


kind, threads, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1
make = fp32_moe if kind == "fp32" else (lambda S: int4_moe(S, 8) if kind == "int8" else int4_moe(S))
only = [int(a) for a in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1, 2, 4]
variants = {S: make(S) for S in only}


def baseline():
    a = helper.make_node("MatMul", ["x", "W1"], ["h"])
    sl = helper.make_node("Slice", ["h", "z", "half", "ax"], ["h2"])
    b = helper.make_node("MatMul", ["h2", "W2"], ["y"])
    xx = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])
    yy = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])
    inits = [
        numpy_helper.from_array(rng.standard_normal((H, 4 * I * 2), np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((4 * I, H), np.float32), "W2"),
        numpy_helper.from_array(np.array([0], np.int64), "z"),
        numpy_helper.from_array(np.array([4 * I], np.int64), "half"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
    ]
    m = helper.make_model(
        helper.make_graph([a, sl, b], "b", [xx], [yy], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    m.ir_version = 10
    return m.SerializeToString(), lambda probs, wts: {}


if kind == "fp32":
    variants["matmul"] = baseline()
sess = {S: session(b, threads) for S, (b, _) in variants.items()}
x = rng.standard_normal((N, H), np.float32)
draws = [routing(N) for _ in range(40)]
ref = [] if 1 not in sess else [sess[1].run(None, {"x": x, **variants[1][1](*d)})[0] for d in draws[:5]]
# same weights for every S, so the outputs must agree
for S in [v for v in variants if isinstance(v, int) and v != 1 and 1 in variants]:
    out = [sess[S].run(None, {"x": x, **variants[S][1](*d)})[0] for d in draws[:5]]
    diff = max(np.abs(a - b).max() for a, b in zip(ref, out, strict=True))
    print(f"S={S} max|diff| {diff:.3g} (ref scale {np.abs(ref[0]).max():.3g})")
times = {S: [] for S in sess}
for _rnd in range(5):
    for S in sess:
        feeds = [{"x": x, **variants[S][1](*d)} for d in draws]
        t = time.perf_counter()
        for f in feeds * 5:
            sess[S].run(None, f)
        times[S].append((time.perf_counter() - t) / (len(feeds) * 5) * 1e6)
for S, ts in times.items():
    print(f"{kind} N={N} threads={threads} S={S}: median {np.median(ts):.1f} us/call  rounds {[round(t) for t in ts]}")
