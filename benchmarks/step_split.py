"""Where a monolithic bundle's decode step goes, without the profiler: step time as is, and with one operator
type short-circuited, the bytes a step reads, and the bandwidth that implies against this VM's read bandwidth.

onnxruntime's node profiler inflates small kernels (a [1, 16, 1, 64] Abs shows ≈ 6 µs under it; a chain of
plain Adds on 1024 floats measures 0.4 µs a kernel without it), so its per-operator shares overstate glue.
Here every variant is the bundle's own decode graph, run bare at batch 1 on random caches of ``--cached``
tokens; ``--without QMoE`` replaces each QMoE by an Identity of its input (the layer then skips its routed
experts: wrong values, the right shapes; other operators get a broadcast column, see ``without``), so the
difference is what those kernels cost inside the real step, with the other weights competing for the caches.
Variants alternate per round, each in a fresh process. The differences do not add up to the step: without one
class of kernels the others find more of their weights in cache.

    .venv/bin/python benchmarks/step_split.py benchmarks/out/ds3bench.int4-g128.ctx584.bundle --without QMoE

Bytes per token count every initializer read at decode: all of them but the token embedding (one row) and the
routed experts, of which k of E per MoE layer (the bundle's own k/E).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import read_bandwidth_gbps  # noqa: E402 — sibling script


def decode_bytes(model: onnx.ModelProto, spec: dict) -> float:
    """Bytes of weights one decode step reads (see the module docstring)."""
    moe = spec.get("moe") or {}
    routed = moe.get("n_routed_experts") or 0
    share = (moe.get("num_experts_per_tok") or 0) / routed if routed else 0.0
    total = 0.0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if "embed_tokens" in t.name:
            continue
        total += size * share if ".experts." in t.name else size
    return total


def without(model: onnx.ModelProto, op_type: str | None) -> bytes:
    """The graph with every ``op_type`` node's output replaced by a cheap stand-in of the same shape: its first
    input for a shape-preserving op (QMoE), else that input's first column broadcast to the op's output width
    (MatMulNBits: its N; MatMulIntegerToFloat: its weight's last dim) by 6 tiny kernels. None: unchanged."""
    variant = copy.deepcopy(model)
    weights = {t.name: list(t.dims) for t in variant.graph.initializer}
    nodes = []
    for n in variant.graph.node:
        if n.op_type != op_type:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        width = attrs.get("N") or (weights.get(n.input[1], [None])[-1] if len(n.input) > 1 else None)
        x, y = n.input[0], n.output[0]
        if op_type == "QMoE" or width is None:
            nodes.append(helper.make_node("Identity", [x], [y], name=n.name))
            continue
        const = {f"{y}.{k}": v for k, v in {"zero": [0], "one": [1], "last": [-1], "width": [width]}.items()}
        for name, value in const.items():
            variant.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.int64), name))
        nodes += [helper.make_node("Slice", [x, f"{y}.zero", f"{y}.one", f"{y}.last"], [f"{y}.slice"]),
                  helper.make_node("Cast", [f"{y}.slice"], [f"{y}.col"], to=onnx.TensorProto.FLOAT),
                  helper.make_node("Shape", [x], [f"{y}.shape"]),
                  helper.make_node("Slice", [f"{y}.shape", f"{y}.zero", f"{y}.last"], [f"{y}.lead"]),
                  helper.make_node("Concat", [f"{y}.lead", f"{y}.width"], [f"{y}.dims"], axis=0),
                  helper.make_node("Expand", [f"{y}.col", f"{y}.dims"], [y])]
    del variant.graph.node[:]
    variant.graph.node.extend(nodes)
    return variant.SerializeToString()


def session(blob: bytes, graphs: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graphs))
    options.log_severity_level = 3  # the short-circuited variants leave unused initializers: expected
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])


def decode_feeds(sess: ort.InferenceSession, cached: int, max_context: int) -> dict[str, np.ndarray]:
    """One decode step's inputs: an MLA latent cache of ``cached`` rows, or a GroupQueryAttention cache buffer of
    the bundle's whole context (``M``) of which the attention mask makes ``cached`` rows valid."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[cached]], np.int64),
             "attention_mask": np.ones((1, cached + 1), np.int64), "logits_from": np.array([0], np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past."):
            dims = [{"B": 1, "S": cached, "M": max_context}.get(d, d) for d in inp.shape]
            feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}


def time_variant(bundle: Path, op: str | None, cached: int, steps: int, threads: int) -> float:
    """ms per decode step of one variant (run in a process of its own: spinning pools of several sessions in
    one process slow each other down, 2.7 → 3.3 ms a step with four alive)."""
    graphs = bundle / "graphs"
    sess = session(without(onnx.load(graphs / "decoder.onnx", load_external_data=False), op), graphs, threads)
    feeds = decode_feeds(sess, cached, json.loads((bundle / "manifest.json").read_text())["max_context"])
    for _ in range(30):
        sess.run(None, feeds)
    best = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            sess.run(None, feeds)
        best.append((time.perf_counter() - start) / steps * 1e3)
    return float(np.median(best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--without", nargs="*", default=["QMoE"], help="operator types to short-circuit, one each")
    parser.add_argument("--cached", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one variant in this process
    args = parser.parse_args()
    if args.one is not None:
        print(time_variant(args.bundle, args.one or None, args.cached, args.steps, args.threads))
        return

    model = onnx.load(args.bundle / "graphs" / "decoder.onnx", load_external_data=False)
    spec = json.loads((args.bundle / "manifest.json").read_text())["model"]
    variants = {"as exported": "", **{f"without {op}": op for op in args.without}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    bandwidths = []
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth_gbps(args.threads))
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            cmd = [sys.executable, __file__, str(args.bundle), "--one", variants[name], "--cached", str(args.cached),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            times[name].append(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()),
              file=sys.stderr, flush=True)
    step = float(np.median(times["as exported"]))
    read = decode_bytes(model, spec)
    print(f"{args.bundle.name}: {read / 1e6:.1f} MB of weights per step, {args.cached} cached, {args.threads} threads,"
          f" read {min(bandwidths):.1f}–{max(bandwidths):.1f} GB/s (numpy probe), load {os.getloadavg()[0]:.2f}")
    print(f"  as exported     {step:.3f} ms/step (median of {args.rounds}) → {read / step / 1e6:.1f} GB/s of weights")
    for name in list(variants)[1:]:
        median = float(np.median(times[name]))
        print(f"  {name:15s} {median:.3f} ms/step: the {name[8:]} kernels cost {step - median:.3f} ms"
              f" ({(step - median) / step:.0%} of the step)")


if __name__ == "__main__":
    main()
