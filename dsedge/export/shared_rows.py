"""Expert partitions that read their weights from the layer-fused experts graph's file, not a copy.

A layer's routed experts are written once, as the stacked ``[E, …]`` tensors of one QMoE over all of them
(the "layer_experts" graph). Each expert partition of that layer is a QMoE over a range of experts, whose
stacked tensors are exactly rows ``[first, last)`` of those: contiguous bytes of the same file. So a
partition's initializers are ONNX external-data references (location, offset, length) into that file, and
the bundle holds the experts once whichever way the runtime runs them: the fused graph when every partition
of the layer is resident (one kernel call per layer), the partitions when a memory budget keeps only some.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from onnx import helper

from dsedge.export.graph import GraphBuilder
from dsedge.manifest import GraphEntry

log = logging.getLogger(__name__)


class FusedRows:
    """The external initializers of one written layer_experts graph, by name, sliced by expert rows."""

    def __init__(self, root: Path, fused: GraphEntry):
        self.root, self.folder = root, PurePosixPath(fused.file).parent
        model = onnx.load_model(str(root / fused.file), load_external_data=False)
        self.tensors = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        self.used: set[str] = set()  # bundle-relative files the partition being built references
        self.borrowed_bytes = 0  # bytes of those references (the partition's share of the fused file)

    def start(self) -> None:
        """Before each partition: its own tallies."""
        self.used, self.borrowed_bytes = set(), 0

    def reference(self, name: str, array: np.ndarray, first: int) -> onnx.TensorProto | None:
        """A reference to rows ``first …`` of the fused tensor ``name`` when they hold exactly ``array``."""
        tensor = self.tensors.get(name)
        if tensor is None or not array.ndim or tuple(tensor.dims[1:]) != array.shape[1:] \
                or tensor.data_type != helper.np_dtype_to_tensor_dtype(array.dtype) \
                or first + array.shape[0] > tensor.dims[0]:
            return None
        where = {e.key: e.value for e in tensor.external_data}
        row_bytes = int(where["length"]) // tensor.dims[0]
        offset = int(where.get("offset", 0)) + first * row_bytes
        rel = str(self.folder / where["location"])
        with open(self.root / rel, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            if view[offset:offset + array.nbytes] != memoryview(np.ascontiguousarray(array)).cast("B"):
                log.warning("export: partition tensor %s differs from the layer's fused experts: it keeps its own "
                            "copy", name)
                return None
        ref = onnx.TensorProto(name=name, data_type=tensor.data_type, dims=array.shape,
                               data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", where["location"]), ("offset", offset), ("length", array.nbytes)):
            ref.external_data.add(key=key, value=str(value))
        self.used.add(rel)
        self.borrowed_bytes += array.nbytes
        return ref


class RowSharingBuilder(GraphBuilder):
    """A partition's GraphBuilder whose large initializers point into the layer's fused experts file."""

    def __init__(self, name: str, data_path: Path | None, half: bool, rows: FusedRows, first: int):
        super().__init__(name, data_path, half)
        self.rows, self.first = rows, first

    def _initializer(self, name: str, array: np.ndarray) -> str:
        reference = self.rows.reference(name, array, self.first) if self._data is not None else None
        if reference is None:
            return super()._initializer(name, array)
        self.initializers.append(reference)
        return name
