"""Where a monolithic bundle's decode step goes, without the profiler: step time as is, and with one operator
type short-circuited, the bytes a step reads, and the bandwidth that implies against this VM's read bandwidth.

onnxruntime's node profiler inflates small kernels (a [1, 16, 1, 64] Abs shows ≈ 6 µs under it; a chain of
plain Adds on 1024 floats measures 0.4 µs a kernel without it), so its per-operator shares overstate glue.
Here every variant is the bundle's own decode graph (a partitioned bundle's: the one graph the runtime composes
with every expert resident), run bare at batch 1 on random caches of ``--cached``
tokens; ``--without QMoE`` replaces each QMoE by an Identity of its input (the layer then skips its routed
experts: wrong values, the right shapes; other operators get a broadcast column, see ``without``), so the
difference is what those kernels cost inside the real step, with the other weights competing for the caches.
Variants alternate per round, each in a fresh process. The differences do not add up to the step: without one
class of kernels the others find more of their weights in cache.

    .venv/bin/python benchmarks/step_split.py benchmarks/out/ds3bench.int4-g128.ctx584.bundle --without QMoE
    .venv/bin/python benchmarks/step_split.py BUNDLE --without --custom moe dense heads moe+dense+heads \
        --llamacpp benchmarks/out/ds3bench.Q4_0.gguf

``--custom`` adds variants (kinds joined by +: moe, dense, heads, mapped, copied) that run the prototype AVX-512 VNNI
kernels of kernels/src/vnni_ops.c (built here with gcc) in place of stock ones, and first prints how far
one decode step's logits move; each variant's RSS (anonymous and file-backed) is printed with it; ``--llamacpp``
adds llama-bench's generation at the same depth to every round, for its time per token beside the bare steps
(which leave out dsedge's per-token Python work: 0.075 ms a token on ds3bench int4, session 19).

Bytes per token count every initializer read at decode: all of them but the token embedding (one row) and the
routed experts, of which k of E per MoE layer (the bundle's own k/E).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
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
from decode_bench import llamacpp_speeds  # noqa: E402
from export_bench import read_bandwidth_gbps  # noqa: E402 — sibling script
from ort_probes import build_custom_ops  # noqa: E402


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


CUSTOM = "custom:"  # variants that run kernels/src/vnni_ops.c: custom:moe, custom:dense+heads, ...
CUSTOM_DOMAIN = "com.dsedge"


def with_custom_ops(model: onnx.ModelProto, graphs: Path, kinds: set[str]) -> bytes:
    """The graph with the prototype kernels of kernels/src/vnni_ops.c in place of stock ones: "moe", every
    int4 QMoE as ``MoEInt4`` over the same inputs and attributes; "dense", every symmetric int4 MatMulNBits as
    ``MatMulInt4`` (same inputs) whose K is a multiple of 128 and of its block (V2-Lite's dense MLP, K = 10944,
    keeps MatMulNBits); "mapped" (with "moe"), MoEInt4's expert weights as graph inputs, fed from the bundle's
    files memory-mapped (``mapped_feeds``): an offloaded expert read straight from its file; "heads", every
    absorbed-MLA per-head product (QuantizeLinear per row → MatMulIntegerToFloat → Mul by the row scale) as one
    ``HeadMatMulU8`` over the row's fp32 activations and the weights repacked to its layout. Nodes left without
    consumers are dropped."""
    variant = copy.deepcopy(model)
    if "moe" in kinds:
        for n in variant.graph.node:
            if n.op_type == "QMoE":
                n.CopyFrom(custom_moe_node(n))
    if "dense" in kinds:
        for n in variant.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            whole = attrs.get("K", 1) % math.lcm(attrs.get("block_size", 1), 128) == 0 and attrs.get("N", 1) % 4 == 0
            if n.op_type == "MatMulNBits" and attrs.get("bits") == 4 and len([i for i in n.input if i]) == 3 and whole:
                n.CopyFrom(helper.make_node("MatMulInt4", list(n.input[:3]), list(n.output), name=n.name,
                                            domain=CUSTOM_DOMAIN, K=attrs["K"], N=attrs["N"],
                                            block_size=attrs["block_size"]))
    if "heads" in kinds:
        custom_head_products(variant, graphs)
    if "mapped" in kinds:
        for name in mapped_weights(variant):
            tensor = next(t for t in variant.graph.initializer if t.name == name)
            variant.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            variant.graph.initializer.remove(tensor)
    drop_dead_nodes(variant.graph)
    variant.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return variant.SerializeToString()


def custom_moe_node(n: onnx.NodeProto) -> onnx.NodeProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    inputs = list(n.input) + [""] * (15 - len(n.input))
    # biases (4, 7), fc3 (8-10), zero points (11-13) absent; router weights (14) given; blocks, not per-row scales
    absent = any(inputs[i] for i in (4, *range(7, 14)))
    if attrs.get("expert_weight_bits") != 4 or attrs.get("swiglu_fusion") != 1 or absent or not inputs[14] or \
            attrs.get("block_size", 0) <= 0:
        raise SystemExit(f"{n.name}: not an int4 block-wise QMoE in the layout MoEInt4 takes")
    return helper.make_node("MoEInt4", [inputs[i] for i in (0, 1, 2, 3, 5, 6, 14)], list(n.output), name=n.name,
                            domain=CUSTOM_DOMAIN, k=attrs["k"], block_size=attrs["block_size"],
                            normalize_routing_weights=attrs.get("normalize_routing_weights", 0))


def mapped_weights(model: onnx.ModelProto) -> list[str]:
    """The expert codes and scales every QMoE (its inputs 2, 3, 5, 6) or MoEInt4 (2–5) of ``model`` reads."""
    picks = {"QMoE": (2, 3, 5, 6), "MoEInt4": (2, 3, 4, 5)}
    return [n.input[i] for n in model.graph.node if n.op_type in picks for i in picks[n.op_type]]


def mapped_feeds(model: onnx.ModelProto, folder: Path) -> dict[str, np.ndarray]:
    """Read-only np.memmap views of the stored bytes of every routed-expert weight (external data, as exported)."""
    feeds = {}
    tensors = {t.name: t for t in model.graph.initializer}
    for name in mapped_weights(model):
        tensor = tensors[name]
        where = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            raise SystemExit(f"{name}: stored inside the graph, not in a file to map")
        feeds[name] = np.memmap(folder / where["location"], helper.tensor_dtype_to_np_dtype(tensor.data_type), "r",
                                int(where.get("offset", 0)), tuple(tensor.dims))
    return feeds


def custom_head_products(model: onnx.ModelProto, graphs: Path) -> None:
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}
    for n in list(graph.node):
        quant = producer.get(n.input[0]) if n.op_type == "MatMulIntegerToFloat" else None
        if quant is None or quant.op_type != "QuantizeLinear" or n.input[1] not in inits:
            continue
        rescale = consumers[n.output[0]][0]  # the Mul by each row's scale, as the export writes it
        if len(consumers[n.output[0]]) != 1 or rescale.op_type != "Mul" or quant.input[1] not in rescale.input or \
                (len(n.input) > 5 and n.input[5]):
            raise SystemExit(f"{n.name}: not the per-row int8 product chain HeadMatMulU8 replaces")
        weight = tensor_array(inits[n.input[1]], graphs)
        heads, k, cols = weight.shape
        packed = (weight.astype(np.int16) + 128).astype(np.uint8).reshape(heads, k // 4, 4, cols).transpose(0, 1, 3, 2)
        scale = tensor_array(inits[n.input[3]], graphs).reshape(heads, cols)
        for name, array in ((n.input[1] + ".u8", np.ascontiguousarray(packed)), (n.input[3] + ".hn", scale)):
            graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        custom = helper.make_node("HeadMatMulU8", [quant.input[0], n.input[1] + ".u8", n.input[3] + ".hn"],
                                  list(rescale.output), name=n.name + ".custom", domain=CUSTOM_DOMAIN)
        at = list(graph.node).index(rescale)
        graph.node.remove(rescale)
        graph.node.insert(at, custom)


def tensor_array(tensor: onnx.TensorProto, graphs: Path) -> np.ndarray:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        tensor = copy.deepcopy(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(graphs))
    return onnx.numpy_helper.to_array(tensor)


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    wanted = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in wanted for o in n.output):
            keep.append(n)
            wanted.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


def session(blob: bytes, graphs: Path, threads: int, library: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graphs))
    options.log_severity_level = 3  # the short-circuited variants leave unused initializers: expected
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])


def decode_feeds(sess: ort.InferenceSession, cached: int, max_context: int, new: int = 1) -> dict[str, np.ndarray]:
    """One step's inputs, ``new`` tokens after ``cached`` (a decode step: 1; a prefill: cached 0), the last
    position's logits: an MLA latent cache of ``cached`` rows, or a GroupQueryAttention cache buffer of the
    bundle's whole context (``M``) of which the attention mask makes ``cached`` rows valid."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(2, 1000, (1, new)).astype(np.int64),
             "position_ids": np.arange(cached, cached + new, dtype=np.int64)[None],
             "attention_mask": np.ones((1, cached + new), np.int64), "logits_from": np.array([new - 1], np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past."):
            dims = [{"B": 1, "S": cached, "M": max_context}.get(d, d) for d in inp.shape]
            feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}


class _Composed(Exception):
    """Raised with a partitioned bundle's composed graph once the runtime has built it (no session made)."""


@functools.lru_cache(maxsize=1)  # composing a partitioned bundle loads it: once per process (callers copy)
def source_graph(bundle: Path) -> tuple[onnx.ModelProto, Path]:
    """The bundle's decoder graph and the folder its external data is relative to: a monolithic bundle's
    decoder.onnx, or for a partitioned one the graph the runtime composes when every expert is resident
    (dsedge/runtime/compose.py; its data locations are relative to the bundle root)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("layout") != "partitioned":
        return onnx.load(bundle / "graphs" / "decoder.onnx", load_external_data=False), bundle / "graphs"
    from dsedge.runtime import load_bundle
    from dsedge.runtime.engine import Engine

    def capture(self, graph, model=None, *args, **kwargs):
        if model is not None and graph.name == "decoder (composed)":
            raise _Composed(model)
        return original(self, graph, model, *args, **kwargs)

    original, Engine.session = Engine.session, capture
    try:
        load_bundle(bundle, verify=False)
    except _Composed as composed:
        return onnx.load_from_string(composed.args[0]), bundle
    finally:
        Engine.session = original
    raise SystemExit(f"{bundle}: the runtime did not compose this partitioned bundle into one graph")


def variant_session(bundle: Path, op: str | None, threads: int, library: str | None,
                    ) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """The variant's session, and the inputs it takes beyond a step's (memory-mapped expert weights)."""
    model, graphs = source_graph(bundle)
    if op and op.startswith(CUSTOM):
        kinds = set(op[len(CUSTOM):].split("+"))
        copied = "copied" in kinds  # as "mapped", the views copied into anonymous memory first
        kinds = kinds - {"copied"} | ({"mapped"} if copied else set())
        if "mapped" in kinds and "moe" not in kinds:
            raise SystemExit(f"{op}: mapped and copied feed MoEInt4's weights, so they need moe")
        mapped = mapped_feeds(model, graphs) if "mapped" in kinds else {}
        if copied:
            mapped = {name: np.array(view) for name, view in mapped.items()}
        return session(with_custom_ops(model, graphs, kinds), graphs, threads, library), mapped
    return session(without(model, op), graphs, threads), {}


def time_variant(bundle: Path, op: str | None, cached: int, steps: int, threads: int, library: str | None,
                 new: int = 1) -> tuple[float, dict[str, float]]:
    """ms per step of one variant (run in a process of its own: spinning pools of several sessions in one
    process slow each other down, 2.7 → 3.3 ms a step with four alive), and the process's RSS then."""
    sess, extra = variant_session(bundle, op, threads, library)
    feeds = {**decode_feeds(sess, cached, json.loads((bundle / "manifest.json").read_text())["max_context"], new),
             **extra}
    for _ in range(min(30, steps)):
        sess.run(None, feeds)
    best = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            sess.run(None, feeds)
        best.append((time.perf_counter() - start) / steps * 1e3)
    return float(np.median(best)), rss_gib()


def rss_gib() -> dict[str, float]:
    """This process's resident memory now, anonymous and file-backed (a mapped file's pages it touched)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 2**20 for key in ("RssAnon", "RssFile")}


def custom_agreement(bundle: Path, variant: str, cached: int, threads: int, library: str, new: int = 1) -> str:
    """How far a custom-kernel variant's last logits are from the stock graph's, on the timing feeds."""
    stock = variant_session(bundle, None, threads, None)[0]
    feeds = decode_feeds(stock, cached, json.loads((bundle / "manifest.json").read_text())["max_context"], new)
    want = stock.run(["logits"], feeds)[0]
    del stock
    custom, extra = variant_session(bundle, variant, threads, library)
    got = custom.run(["logits"], {**feeds, **extra})[0]
    argmax = "equal" if got.argmax() == want.argmax() else "DIFFERS"
    return (f"{variant} vs stock, {new} new after {cached} cached: max |Δlogit| {np.abs(got - want).max():.2e} "
            f"(logits up to {np.abs(want).max():.2f}), argmax {argmax}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--without", nargs="*", default=["QMoE"], help="operator types to short-circuit, one each")
    parser.add_argument("--cached", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--custom", nargs="*", default=[], metavar="KINDS",
                        help="also time the step with prototype kernels (kernels/src/vnni_ops.c) in place of "
                             "every int4 QMoE (moe), int4 MatMulNBits (dense), absorbed-MLA per-head product (heads);"
                             " with moe, 'mapped' feeds the experts from memory-mapped bundle files and 'copied' from "
                             "anonymous copies; one variant per argument, kinds joined by + (moe+dense+heads)")
    parser.add_argument("--llamacpp", type=Path, metavar="GGUF",
                        help="also run llama-bench's generation at the same depth on this GGUF in every round "
                             "(../shared/bench/llamacpp.sh), for its time per token beside the bare steps")
    parser.add_argument("--prefill", type=int, metavar="N",
                        help="time one N-token prefill (nothing cached) instead of a decode step; give --steps 3")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one variant in this process
    parser.add_argument("--library", help=argparse.SUPPRESS)  # internal: the built prototype kernel
    args = parser.parse_args()
    new = args.prefill or 1
    if args.prefill:
        args.cached = 0
        if args.llamacpp:
            raise SystemExit("--llamacpp times generation only: leave out --prefill")
    if args.one is not None:
        ms, memory = time_variant(args.bundle, args.one or None, args.cached, args.steps, args.threads, args.library,
                                  new)
        print(json.dumps({"ms": ms, **memory}))
        return

    model = source_graph(args.bundle)[0]
    spec = json.loads((args.bundle / "manifest.json").read_text())["model"]
    variants = {"as exported": "", **{f"without {op}": op for op in args.without}}
    library = None
    if args.custom:
        library = str(build_custom_ops())
        for kinds in args.custom:
            variants[f"custom {kinds}"] = CUSTOM + kinds
            print(custom_agreement(args.bundle, CUSTOM + kinds, args.cached, args.threads, library, new),
                  file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, dict] = {}  # the last round's RSS per variant (anonymous / file-backed)
    bandwidths = []
    if args.llamacpp:
        variants["llama.cpp"] = "llama.cpp"
        times["llama.cpp"] = []
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth_gbps(args.threads))
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            if name == "llama.cpp":
                tps = llamacpp_speeds(args.llamacpp, args.threads, [args.cached], 64, 0)["decode"][args.cached]
                times[name].append(1e3 / tps)
                continue
            cmd = [sys.executable, __file__, str(args.bundle), "--one", variants[name], "--cached", str(args.cached),
                   "--steps", str(args.steps), "--threads", str(args.threads), *(["--prefill", str(new)] * (new > 1))]
            cmd += ["--library", library] if library else []
            one = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            times[name].append(one["ms"])
            memory[name] = one
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {t[-1]:.3f}" for n, t in times.items()),
              file=sys.stderr, flush=True)
    step = float(np.median(times["as exported"]))
    read = decode_bytes(model, spec)
    print(f"{args.bundle.name}: {read / 1e6:.1f} MB of weights per step, {args.cached} cached, {args.threads} threads,"
          f" read {min(bandwidths):.1f}–{max(bandwidths):.1f} GB/s (numpy probe), load {os.getloadavg()[0]:.2f}")
    unit = "ms/step" if new == 1 else f"ms/prefill of {new}"
    rate = f" → {read / step / 1e6:.1f} GB/s of weights" if new == 1 else ""
    print(f"  as exported     {step:.3f} {unit} (median of {args.rounds}){rate}{rss(memory['as exported'])}")
    for name in list(variants)[1:]:
        median = float(np.median(times[name]))
        if name == "llama.cpp":
            print(f"  {name:15s} {median:.3f} ms/token (llama-bench tg64 at depth {args.cached}; the step as "
                  f"exported is {median / step:.2f}x its speed, without dsedge's per-token Python work)")
            continue
        if variants[name].startswith(CUSTOM):
            print(f"  {name:15s} {median:.3f} {unit} (the step as exported is {step / median:.2f}x this)"
                  f"{rss(memory[name])}")
            continue
        print(f"  {name:15s} {median:.3f} {unit}: the {name[8:]} kernels cost {step - median:.3f} ms"
              f" ({(step - median) / step:.0%} of the step)")


def rss(one: dict) -> str:
    return f"; RSS {one['RssAnon']:.2f} GiB anonymous + {one['RssFile']:.2f} GiB file-backed"


if __name__ == "__main__":
    main()
