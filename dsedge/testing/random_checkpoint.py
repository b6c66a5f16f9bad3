"""Random-weight checkpoints of any shape, written one tensor at a time (memory follows one tensor).

For memory tests and scale benchmarks: a config dict (any supported ``model_type``) becomes a checkpoint
directory with one shard per decoder layer plus one for the rest, each shard's safetensors header written
first and then each tensor's bytes as it is generated — a full-size DeepSeek-V3 layer (10.5 GiB in FP8)
never exists in memory at once. ``dtype`` is the storage dtype of the float tensors; with ``fp8_block`` the
2-D projections of the decoder layers are FP8 e4m3 with float32 ``weight_scale_inv`` per block (as
DeepSeek-V3 ships them) and config.json gets the matching ``quantization_config``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from dsedge.models.fp8 import scale_grid
from dsedge.models.registry import spec_from_config
from dsedge.testing.tokenizer import write_tokenizer

LINEAR_STD = 0.02
ROUTER_STD = 0.1
FP8_MAX = 448.0
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                      torch.float8_e4m3fn: "F8_E4M3"}


def write_random_checkpoint(out: str | Path, config: dict, *, seed: int = 0, dtype: str = "bfloat16",
                            fp8_block: int | None = None, tokenizer: bool = True) -> Path:
    """Write a random checkpoint for ``config`` into ``out`` (created) and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype=dtype)
    if fp8_block:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [fp8_block, fp8_block]}
    spec = spec_from_config(config)
    shards: dict[str, list] = {}
    for t in spec.expected_tensors():
        shards.setdefault(f"layer-{t.layer:03d}.safetensors" if t.layer is not None else "top.safetensors",
                          []).append(t)
    generator = torch.Generator().manual_seed(seed)
    float_dtype = getattr(torch, dtype)
    weight_map = {}
    for shard, tensors in shards.items():
        entries = []  # (name, dtype, shape, maker)
        for t in tensors:
            fp8 = bool(fp8_block) and t.linear and t.layer is not None and len(t.shape) == 2
            entries += _entries(t, float_dtype, fp8, fp8_block, generator)
        _write_streamed(out / shard, entries)
        weight_map |= {name: shard for name, *_ in entries}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer:
        write_tokenizer(out)
    return out


def _entries(t, float_dtype, fp8: bool, block: int | None, generator) -> list[tuple]:
    name, shape = t.name, tuple(t.shape)
    if fp8:
        grid = scale_grid(shape, (block, block))
        # W = q × s: q ~ N(0, 1) in e4m3, s ≈ LINEAR_STD per block, so W has the float checkpoint's spread
        return [(name, torch.float8_e4m3fn, shape,
                 lambda: torch.randn(shape, generator=generator).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)),
                (name + "_scale_inv", torch.float32, grid,
                 lambda: LINEAR_STD * (1 + 0.1 * torch.rand(grid, generator=generator)))]
    if name.endswith("norm.weight"):
        return [(name, float_dtype, shape, lambda: (1 + 0.1 * torch.randn(shape, generator=generator)).to(float_dtype))]
    if name.endswith("e_score_correction_bias"):
        return [(name, torch.float32, shape, lambda: 0.1 * torch.randn(shape, generator=generator))]
    std = ROUTER_STD if name.endswith("mlp.gate.weight") else LINEAR_STD
    return [(name, float_dtype, shape, lambda: (std * torch.randn(shape, generator=generator)).to(float_dtype))]


def _write_streamed(path: Path, entries: list[tuple]) -> None:
    """A safetensors file: the header from the shapes, then each tensor made and written in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as the reference writer pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, dtype, _, make in entries:
            tensor = make()
            assert tensor.dtype == dtype
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor
