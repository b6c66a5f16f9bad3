"""``dsedge compress``: weight-only quantization (RTN, GPTQ) by recipe, expert pruning, compressed-tensors output.

Light on import: torch is pulled in only by :mod:`.quant`, :mod:`.packing`'s pack/unpack and the pipeline.
"""
