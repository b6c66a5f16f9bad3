"""Missed expert partitions run from the bundle's file, where the dsedge-kernels library serves them.

Under a memory budget a partition that is not resident used to be loaded at a miss: a session of its graph,
whose weights onnxruntime prepacks (3-6 ms for one DeepSeek-V2-Lite expert, against 0.05 ms to run it), which
made decode with 25% of the experts resident 7-8x the resident time per token (docs/scale.md). Fed the weights
as graph inputs instead, onnxruntime's QMoE and MatMulNBits dequantize them on every call (2-7 ms). The
``MoEInt4`` op of ``dsedge-kernels`` (kernels/: AVX-512 VNNI, or AVX2 and FMA) computes QMoE's int4 block layout
from the stored codes as they are, so a miss here is one run of a standing session of the partition's graph,
with QMoE swapped for MoEInt4 and the codes and scales fed as read-only views of the bundle's verified file (one
``mmap`` per file): no session is created and nothing is copied at a miss, the kernel reads the bytes where the
page cache holds them. The budget then bounds what the process allocates; a streamed expert's pages belong to
the page cache, which the OS evicts and refills (from disk, at its speed).

Partitions of the same shape share one session: the rewritten graph names the streamed weights by their role
(``SHARED_NAMES``) and takes its small inline constants (an expert partition's range) as inputs too, so the graphs
of a layer's partitions, and of layers alike, are the same bytes; each partition feeds its own views and
constants. V2-Lite-8 with 25% resident created a session per missed partition at its first miss (338); now 4,
and a fresh process's first 512-token prefill went from 3.3-3.4 to 2.8-2.9 s (docs/scale.md, session 21).

A graph is rewritten at the protobuf wire level (the runtime does not depend on ``onnx``; field numbers as in
dsedge.runtime.compose): only a partition whose one QMoE is 4-bit block-wise SwiGLU (gate/up interleaved),
float32, with widths the kernel takes, is streamed; any other partition is loaded as before. ``DSEDGE_KERNELS=0``
turns the kernels off; a CPU without AVX2 and FMA never uses them.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dsedge.contract import EXPERT_WEIGHTS, MOE_INPUT, ROUTED
from dsedge.errors import UserError
from dsedge.manifest import GraphEntry, Manifest
from dsedge.onnx_refs import message_fields, tensor_dims, tensor_external_range, tensor_name, value_info_type
from dsedge.onnx_wire import bytes_field, group, message, raw_field, varint_field
from dsedge.runtime.bundle import verified_graph_path
from dsedge.runtime.session import ORT_ERRORS, SessionConfig, TimedSession, make_session

log = logging.getLogger(__name__)

KERNEL_DOMAIN = "com.dsedge"
_QMOE_WEIGHTS = (2, 3, 5, 6)  # QMoE inputs fc1 codes, fc1 scales, fc2 codes, fc2 scales
_NP_TYPES = {1: np.float32, 2: np.uint8}  # TensorProto.DataType FLOAT, UINT8
# inline constants fed as inputs (TensorProto.DataType → numpy), at most this many elements each
_CONSTANT_TYPES = {1: "<f4", 2: "u1", 3: "i1", 6: "<i4", 7: "<i8", 9: "?", 11: "<f8"}
_CONSTANT_LIMIT = 64
# the streamed weights' names in the rewritten graph (QMoE inputs 2, 3, 5, 6), the same for every partition
SHARED_NAMES = ("experts.fc1.codes", "experts.fc1.scales", "experts.fc2.codes", "experts.fc2.scales")
_INT, _FLOAT, _STRING = 2, 1, 3  # AttributeProto.AttributeType


class NotStreamable(ValueError):
    """A partition graph the kernel does not take: it is loaded as a session instead."""


def kernel_library() -> str | None:
    """The dsedge-kernels custom-op library for this CPU, or None (not installed, a CPU without AVX2 and FMA, or
    ``DSEDGE_KERNELS=0``). ``DSEDGE_KERNELS=/path/to/library.so``: that build instead (to compare builds)."""
    setting = os.environ.get("DSEDGE_KERNELS", "1")
    if setting.lower() in ("0", "off", "no", "false"):
        return None
    if os.sep in setting:
        if not Path(setting).is_file():
            raise UserError(f"DSEDGE_KERNELS names {setting}, which is not a file", where="DSEDGE_KERNELS",
                            hint="give the path of a built dsedge-kernels library, or 0 to run without it")
        return setting
    try:
        import dsedge_kernels  # optional (kernels/): the stock ops run without it
    except ImportError:
        return None
    path = dsedge_kernels.library_path()
    return str(path) if path is not None and dsedge_kernels.supported() else None


class StreamedSession:
    """A partition run in a standing session of its rewritten graph (shared with the partitions whose graphs are
    the same), with the views of its weights and its constants as feeds; ``run_with`` as the runtime's
    DeclaredSession."""

    def __init__(self, session, inputs: tuple[str, ...], weights: dict[str, np.ndarray],
                 ranges: list[tuple[mmap.mmap, int, int]] = ()):
        self._session, self._inputs, self.weights, self._ranges = session, inputs, weights, ranges

    def run_with(self, values: dict[str, np.ndarray], in_place=None) -> dict[str, np.ndarray]:
        # Ask for the whole expert at once (``ranges``: only where the page cache is not expected to hold the
        # experts, see StreamedPartitions): the kernel's page faults would otherwise read it from disk in
        # readahead-sized pieces, one synchronous read each.
        for data, start, length in self._ranges:
            data.madvise(mmap.MADV_WILLNEED, start, length)
        feeds = {name: values[name] for name in self._inputs} | self.weights
        return {ROUTED: self._session.run([ROUTED], feeds)[0]}


class StreamedPartitions:
    """Sessions for missed partitions, created at a partition's first miss and kept (they hold no weights), one
    per distinct rewritten graph."""

    def __init__(self, manifest: Manifest, config: SessionConfig, library: str, timers=None,
                 streamed_bytes: int = 0):
        self.manifest, self.config, self.library, self.timers = manifest, config, library, timers
        self.sessions: dict[str, StreamedSession | None] = {}
        self.shared: dict[bytes, object] = {}  # rewritten graph's bytes → its session
        self._maps: dict[Path, mmap.mmap] = {}
        self.prefault = _expect_disk_reads(streamed_bytes)

    def session(self, graph: GraphEntry) -> StreamedSession | None:
        """The partition's streamed session, or None where the kernel does not take it (decided once)."""
        if graph.name not in self.sessions:
            self.sessions[graph.name] = self._build(graph)
        return self.sessions[graph.name]

    def _build(self, graph: GraphEntry) -> StreamedSession | None:
        if self.library is None:  # onnxruntime refused the library once: every partition takes the stock path
            return None
        path = verified_graph_path(self.manifest, graph)  # the graph and every file it references, verified
        try:
            rewritten = streamable_graph(path.read_bytes())
            roles = list(zip(SHARED_NAMES, rewritten.weights, strict=True))
            arrays = {name: self._view(path.parent, w) for name, w in roles}
            ranges = [self._range(path.parent, w, arrays[name].nbytes) for name, w in roles] if self.prefault else []
        except (NotStreamable, OSError, ValueError) as exc:  # the stock path loads it (and reports a bad file)
            log.debug("partition %s is loaded, not streamed: %s", graph.name, exc)
            return None
        session = self.shared.get(rewritten.model)
        if session is None:
            try:
                # the graph keeps no external data: nothing is read from data_root
                session = make_session(rewritten.model, self.config, data_root=path.parent, stem=graph.name,
                                       custom_ops_library=self.library)
            except ORT_ERRORS as exc:  # a kernel library this onnxruntime cannot load: the stock path still works
                log.warning("expert partitions are loaded, not streamed: onnxruntime refused %s (%s)", self.library,
                            str(exc)[:300])
                self.library = None
                return None
            self.shared[rewritten.model] = session
        if self.timers is not None:
            session = TimedSession(session, graph.name, self.timers)
        return StreamedSession(session, tuple(t.name for t in graph.inputs), arrays | rewritten.constants, ranges)

    def _range(self, folder: Path, weight: StreamedWeight, nbytes: int) -> tuple[mmap.mmap, int, int]:
        """The weight's bytes in its file's map, widened to whole pages (madvise takes page-aligned starts)."""
        start = weight.offset - weight.offset % mmap.PAGESIZE
        return self._maps[folder / PurePosixPath(weight.location)], start, weight.offset + nbytes - start

    def _view(self, folder: Path, weight: StreamedWeight) -> np.ndarray:
        path = folder / PurePosixPath(weight.location)  # as onnxruntime resolves it; verified_graph_path checked it
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = self._maps[path]
        dtype = np.dtype(_NP_TYPES[weight.data_type])
        count = math.prod(weight.dims)
        if weight.length is not None and weight.length != count * dtype.itemsize \
                or weight.offset + count * dtype.itemsize > len(data):
            raise NotStreamable(f"{weight.name}: external data does not hold {weight.dims} {dtype}")
        return np.frombuffer(data, dtype, count, weight.offset).reshape(weight.dims)


def _expect_disk_reads(streamed_bytes: int) -> bool:
    """Whether misses will mostly read from disk: the experts left out take more than half the memory the OS
    reports available (they will not stay in the page cache). Then each miss asks for its expert's pages in one
    request (madvise WILLNEED): on V2-Lite-8 with every miss read from disk, 6.2 against 1.2 tokens/s
(docs/scale.md). Where the
    page cache keeps them, that request only costs (9-15% of decode there: docs/scale.md), so it is left out.
    ``DSEDGE_STREAM_PREFAULT=1``/``0`` decides instead."""
    forced = os.environ.get("DSEDGE_STREAM_PREFAULT")
    if forced is not None:
        return forced.lower() not in ("0", "off", "no", "false")
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return False
    return streamed_bytes > available // 2


@dataclass(frozen=True)
class StreamedWeight:
    """A QMoE weight the rewritten graph takes as an input, and where its bytes are stored."""

    name: str
    data_type: int  # TensorProto.DataType
    dims: tuple[int, ...]
    location: str  # relative to the graph's folder, as onnxruntime resolves it
    offset: int
    length: int | None


@dataclass(frozen=True)
class StreamableGraph:
    """A partition graph rewritten for MoEInt4: ``model`` takes the streamed weights as inputs named
    ``SHARED_NAMES`` (stored where ``weights`` say, in that order) and its inline constants as inputs fed from
    ``constants``; partitions that differ only in those give the same ``model`` bytes."""

    model: bytes
    weights: list[StreamedWeight]
    constants: dict[str, np.ndarray]


def streamable_graph(model: bytes) -> StreamableGraph:
    """The partition graph with its one QMoE as MoEInt4 and QMoE's codes and scales as graph inputs, and where
    those weights are stored. Raises NotStreamable for a graph the kernel does not take."""
    fields = list(message_fields(memoryview(model)))
    graphs = [v for f, w, v in fields if f == 7 and w == 2]
    if len(graphs) != 1:
        raise NotStreamable("not one graph")
    graph = list(message_fields(graphs[0]))
    nodes = [v for f, w, v in graph if f == 1 and w == 2]
    qmoe = [i for i, n in enumerate(nodes) if _node_op(n) == ("com.microsoft", "QMoE")]
    if len(qmoe) != 1:
        raise NotStreamable(f"{len(qmoe)} QMoE nodes")
    node = _node(nodes[qmoe[0]])
    names = [node["inputs"][i] for i in _QMOE_WEIGHTS]
    tensors = {tensor_name(v): v for f, w, v in graph if f == 5 and w == 2}
    weights = [_weight(tensors.get(name), name) for name in names]
    _check_layout(node, weights, _input_types(graph))
    if any(n in names for i, raw in enumerate(nodes) if i != qmoe[0] for n in _node(raw)["inputs"]) \
            or set(names) & set(node["outputs"]):
        raise NotStreamable("another node reads the expert weights")
    replacement = _moe_int4(node, dict(zip(names, SHARED_NAMES, strict=True)))
    constants: dict[str, np.ndarray] = {}
    declared = set(_input_types(graph))  # an initializer that is also an input's default stays as it is
    out = []
    for field, wire, value in graph:
        if field == 1 and wire == 2 and value is nodes[qmoe[0]]:
            out.append(message(1, replacement))
        elif field == 5 and wire == 2 and tensor_name(value) in names:
            continue  # now an input
        elif field == 5 and wire == 2 and tensor_name(value) not in declared \
                and (constant := _inline_constant(value)) is not None:
            constants[tensor_name(value)] = constant  # now an input: partitions differ in these (their range)
        elif field == 2 and wire == 2:
            out.append(bytes_field(2, "streamed expert partition"))  # the graph's name: the partition's
        else:
            out.append(raw_field(field, wire, value))
    out += [message(11, _value_info(n, w.data_type, w.dims)) for n, w in zip(SHARED_NAMES, weights, strict=True)]
    out += [message(11, _value_info(n, _TYPE_OF[a.dtype.str], a.shape)) for n, a in constants.items()]
    rewritten = [raw_field(f, w, v) for f, w, v in fields if not (f == 7 and w == 2)]
    rewritten.append(message(7, b"".join(out)))
    rewritten.append(message(8, bytes_field(1, KERNEL_DOMAIN) + varint_field(2, 1)))
    return StreamableGraph(b"".join(rewritten), weights, constants)


_TYPE_OF = {np.dtype(v).str: k for k, v in _CONSTANT_TYPES.items()}


def _inline_constant(tensor: memoryview) -> np.ndarray | None:
    """A small initializer stored inside the graph as raw_data, as an array; None for any other."""
    g = group(message_fields(tensor))
    kind, dims = int(g.get(2, [0])[-1]), tensor_dims(tensor)
    if kind not in _CONSTANT_TYPES or 9 not in g or tensor_external_range(tensor) is not None \
            or math.prod(dims) > _CONSTANT_LIMIT or any(f in g for f in (4, 5, 6, 7, 10, 11)):
        return None
    raw = bytes(g[9][-1])
    dtype = np.dtype(_CONSTANT_TYPES[kind])
    if len(raw) != math.prod(dims) * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype).reshape(dims).copy()


def _check_layout(node: dict, weights: list[StreamedWeight], input_types: dict[str, int]) -> None:
    """What MoEInt4 computes as QMoE does: int4 blocks, SwiGLU with gate/up interleaved (alpha 1, beta 0), int8
    activations (accuracy level 4), no biases, fc3 or zero points, router weights given, float32 activations,
    widths multiples of 128 and of the block (the kernel's activation layout)."""
    a, inputs = node["attrs"], node["inputs"] + [""] * (15 - len(node["inputs"]))
    if a.get("expert_weight_bits") != 4 or a.get("swiglu_fusion") != 1 or a.get("activation_type") != "swiglu" \
            or a.get("activation_alpha", 1.0) != 1.0 or a.get("activation_beta", 0.0) != 0.0:
        raise NotStreamable("not 4-bit interleaved SwiGLU")
    if a.get("accuracy_level", 0) != 4:  # below 4 QMoE computes in float; MoEInt4 quantizes activations to int8
        raise NotStreamable(f"accuracy level {a.get('accuracy_level', 0)}, not 4 (int8 activations)")
    if any(inputs[i] for i in (4, *range(7, 14))) or not inputs[14]:
        raise NotStreamable("biases, fc3 or zero points, or no router weights")
    if input_types.get(MOE_INPUT) != 1 or input_types.get(EXPERT_WEIGHTS) != 1:
        raise NotStreamable("activations are not float32")
    block, k = a.get("block_size", 0), a.get("k", 0)
    fc1, s1, fc2, s2 = (w.dims for w in weights)
    if [w.data_type for w in weights] != [2, 1, 2, 1] or len(fc1) != 3 or len(fc2) != 3 or not 0 < block <= 1024 \
            or not 0 < k <= 64:
        raise NotStreamable("not uint8 codes with float scales in blocks")
    experts, hidden, inter = fc1[0], fc1[2] * 2, fc1[1] // 2
    if hidden % math.lcm(128, block) or inter % math.lcm(128, block) or fc2 != (experts, hidden, inter // 2) \
            or s1 != (experts, 2 * inter, hidden // block) or s2 != (experts, hidden, inter // block):
        raise NotStreamable(f"widths {hidden}/{inter} with blocks of {block}")


def _moe_int4(node: dict, renamed: dict[str, str]) -> bytes:
    inputs = node["inputs"] + [""] * (15 - len(node["inputs"]))
    a = node["attrs"]
    fields = [bytes_field(1, renamed.get(inputs[i], inputs[i])) for i in (0, 1, 2, 3, 5, 6, 14)]
    fields += [bytes_field(2, o) for o in node["outputs"]] + [bytes_field(3, node["name"] or "MoEInt4")]
    fields += [bytes_field(4, "MoEInt4"), bytes_field(7, KERNEL_DOMAIN)]
    for key in ("k", "block_size", "normalize_routing_weights"):
        fields.append(message(5, bytes_field(1, key) + varint_field(3, int(a.get(key, 0)))
                               + varint_field(20, _INT)))
    return b"".join(fields)


def _node_op(node: memoryview) -> tuple[str, str]:
    g = group(message_fields(node))
    return bytes(g.get(7, [b""])[-1]).decode(), bytes(g.get(4, [b""])[-1]).decode()


def _node(raw: memoryview) -> dict:
    g = group(message_fields(raw))
    attrs = {}
    for attr in g.get(5, []):
        a = group(message_fields(attr))
        kind, key = a.get(20, [0])[-1], bytes(a.get(1, [b""])[-1]).decode()
        if kind == _INT:
            value = a.get(3, [0])[-1]
            attrs[key] = value - (1 << 64) if value >= 1 << 63 else value
        elif kind == _FLOAT:
            attrs[key] = float(np.frombuffer(bytes(a.get(2, [b"\0" * 4])[-1]), "<f4")[0])
        elif kind == _STRING:
            attrs[key] = bytes(a.get(4, [b""])[-1]).decode()
    return {"inputs": [bytes(v).decode() for v in g.get(1, [])], "outputs": [bytes(v).decode() for v in g.get(2, [])],
            "name": bytes(g.get(3, [b""])[-1]).decode(), "attrs": attrs}


def _weight(tensor: memoryview | None, name: str) -> StreamedWeight:
    if tensor is None:
        raise NotStreamable(f"{name} is not an initializer")
    g = group(message_fields(tensor))
    dims = tensor_dims(tensor)
    where = tensor_external_range(tensor)
    if where is None:
        raise NotStreamable(f"{name} is stored inside the graph")
    return StreamedWeight(name, int(g.get(2, [0])[-1]), dims, where.location, where.offset, where.length)


def _input_types(graph: list) -> dict[str, int]:
    """Element type of each graph input (GraphProto.input = 11)."""
    return dict(value_info_type(v) for f, w, v in graph if f == 11 and w == 2)


def _value_info(name: str, elem_type: int, dims: tuple[int, ...]) -> bytes:
    shape = b"".join(message(1, varint_field(1, d)) for d in dims)
    return bytes_field(1, name) + message(2, message(1, varint_field(1, elem_type) + message(2, shape)))
