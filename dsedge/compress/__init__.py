"""``dsedge compress``: weight-only quantization (RTN, GPTQ) by recipe, expert pruning, compressed-tensors output.

The algorithms live here; the stored format (schemes, quantized tensors, packing, ``quantization_config``)
is :mod:`dsedge.quantformat`. Light on import: :mod:`.recipes`, :mod:`.pruning` and :mod:`.writer` are
torch-free; :mod:`.quant`, :mod:`.calibration` and :mod:`.pipeline` import torch.
"""
