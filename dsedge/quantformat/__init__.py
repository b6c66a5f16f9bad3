"""The weight-quantization *format*: what a compressed checkpoint stores and how to read and write it.

A leaf package (stdlib, numpy-free, torch only inside the functions that touch tensors): the checkpoint
reader (:mod:`dsedge.models`), the quantizers (:mod:`dsedge.compress`) and the exporter
(:mod:`dsedge.export`) all build on it, and it depends on none of them.

* :mod:`.scheme` — :class:`~.scheme.QuantScheme`, how one weight matrix is quantized;
* :mod:`.tensor` — :class:`~.tensor.QuantizedTensor`, its integers, scales and zero points, and dequantization;
* :mod:`.layout` — the compressed-tensors ``pack-quantized`` storage layout: stored group size, shapes, bytes;
* :mod:`.packing` — pack/unpack of one module's tensors in that layout;
* :mod:`.config` — the ``quantization_config`` block of config.json, written and read.

The algorithms that *choose* the integers (RTN, GPTQ, calibration, recipes) live in :mod:`dsedge.compress`.
"""
