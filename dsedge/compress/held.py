"""A decoder layer's matmul weights held as stored, upcast to float32 one module / one expert at a time.

Compress used to read a layer in float32 (42 GiB for one DeepSeek-V3 MoE layer whose FP8 weights are
10.5 GiB). Here each linear weight of the layer is a *held weight*: the checkpoint's bytes as stored
(bf16/fp16, or FP8 e4m3 plus its block scales: :class:`dsedge.models.checkpoint.StoredTensor`) until it is
quantized, then its quantized integers bit-packed (:class:`HeldQuantized`). ``.float()`` gives the float32
weight — the very values the float32 read gave (the same dequantization code), so the forward, the
statistics and GPTQ compute exactly what they computed on a float32 layer.

Why a transformers layer with swapped modules, not a forward of our own: the layer stays the reference
(attention, RoPE, routing are transformers' code, and the streamed pass still reproduces the full model),
and only two kinds of module hold weights that matter for memory: every ``nn.Linear`` becomes a
:class:`HeldLinear` (``F.linear`` on the upcast weight, which is what ``nn.Linear.forward`` runs), and the
fused routed experts become :class:`HeldExperts`, a copy of transformers' eager experts loop that upcasts
one expert's weights at a time. Norms, the router and its bias are small and stay float32 parameters.

Routed experts are not even held as stored: at full size they are the layer (one DeepSeek-V3 MoE layer:
10.5 GiB of FP8 experts, 0.2 GiB of everything else), so an expert is a :class:`LazyStored` read from the
checkpoint each time it is upcast, and once quantized its packed integers go to a per-layer
:class:`SpillFile` (5.6 GiB of int4 codes for that layer) and are read back per use. Compress memory then
follows one expert, not the layer; the bytes read again come from the page cache when it has room.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from dsedge.models.experts import EXPERT_WEIGHT
from dsedge.quantformat.packing import pack_bits, unpack_bits
from dsedge.quantformat.tensor import QuantizedTensor, dequantize


class HeldFloat:
    """A float32 weight held as is (a pruned router row set, a dequantized compressed-checkpoint weight)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def float(self) -> torch.Tensor:
        return self.tensor.float()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class HeldQuantized:
    """A quantized weight with its integers bit-packed (int4: half a byte per weight); ``.float()`` is
    ``dequantize`` of the unpacked integers — what the compressed layer computes with."""

    def __init__(self, qt: QuantizedTensor):
        self.bits, self.cols = qt.scheme.bits, qt.q.shape[1]
        self.packed = pack_bits(qt.q, self.bits) if self.bits < 8 else qt.q
        self.scale, self.zero_point, self.scheme, self.shape = qt.scale, qt.zero_point, qt.scheme, qt.shape

    def quantized(self) -> QuantizedTensor:
        q = unpack_bits(self.packed, self.bits, self.cols) if self.bits < 8 else self.packed
        return QuantizedTensor(q, self.scale, self.zero_point, self.scheme, self.shape)

    def float(self) -> torch.Tensor:
        return dequantize(self.quantized())

    @property
    def nbytes(self) -> int:
        zero = 0 if self.zero_point is None else self.zero_point.numel()
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * 4 + zero


class LazyStored:
    """A checkpoint weight read from disk at each upcast, never held (``nbytes`` 0): a routed expert.
    ``.float()`` is ``Checkpoint.read_stored(name).float()`` — the same bytes and dequantization each time."""

    def __init__(self, ckpt, name: str):
        self.ckpt, self.name = ckpt, name
        self.shape = tuple(ckpt.tensors[name].shape)

    nbytes = 0

    def float(self) -> torch.Tensor:
        return self.ckpt.read_stored(self.name).float()


class SpillFile:
    """Tensors kept in an unlinked temporary file and read back on demand (``put`` → a record, ``get``).

    Why a file and not memory: a full-size layer's quantized experts (V3: 5.6 GiB of int4 codes) are needed
    again only once, for the compressed layer's forward. The file is gone when closed (or the process ends)."""

    def __init__(self, directory: str | None = None):
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 — held open for the layer, closed by close()
        self.end = 0

    def put(self, tensor: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        written = os.pwrite(self.file.fileno(), data, self.end) if data.size else 0
        if written != data.size:
            raise OSError(f"spill file: wrote {written} of {data.size} bytes (disk full?)")
        record = (self.end, tensor.dtype, tuple(tensor.shape))
        self.end += data.size
        return record

    def get(self, record: tuple[int, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        offset, dtype, shape = record
        count = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(count, dtype=torch.uint8)
        got = os.preadv(self.file.fileno(), [raw.numpy()], offset) if count else 0
        if got != count:
            raise OSError(f"spill file: read {got} of {count} bytes")
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()


class SpilledQuantized(HeldQuantized):
    """:class:`HeldQuantized` whose packed integers, scales and zero points live in a :class:`SpillFile`."""

    def __init__(self, qt: QuantizedTensor, spill: SpillFile):
        super().__init__(qt)
        self.spill = spill
        self.packed, self.scale = spill.put(self.packed), spill.put(self.scale)
        self.zero_point = None if self.zero_point is None else spill.put(self.zero_point)

    nbytes = 0

    def quantized(self) -> QuantizedTensor:
        packed, scale = self.spill.get(self.packed), self.spill.get(self.scale)
        zero = None if self.zero_point is None else self.spill.get(self.zero_point)
        q = unpack_bits(packed, self.bits, self.cols) if self.bits < 8 else packed
        return QuantizedTensor(q, scale, zero, self.scheme, self.shape)


class Held:
    """The slot a layer module reads one weight from: its stored form, swapped for the quantized form once
    quantized (:meth:`replace`), so the original's bytes are freed module by module and the layer computes
    compressed from then on without being rebuilt."""

    def __init__(self, value):
        self.value = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def nbytes(self) -> int:
        return self.value.nbytes

    def float(self) -> torch.Tensor:
        return self.value.float()

    def replace(self, value) -> None:
        self.value = value


def is_held(value) -> bool:
    return isinstance(value, Held)


class HeldLinear(nn.Module):
    """``nn.Linear`` over a held weight: upcast for the call, freed after it (``nn.Linear.forward`` is this
    same ``F.linear``)."""

    def __init__(self, held: Held, in_features: int, out_features: int, bias=None):
        super().__init__()
        self.held, self.in_features, self.out_features = held, in_features, out_features
        self.bias = bias  # a plain attribute: the layer's state_dict holds no entry for a held module

    def forward(self, x):
        return F.linear(x, self.held.float(), self.bias)


class HeldExperts(nn.Module):
    """transformers' fused routed experts (``DeepseekV{2,3}Experts``, eager path), over per-expert held
    weights ``[(gate, up, down)]``. The loop is transformers' own, op for op: gate and up are upcast and
    concatenated into the ``[2I, H]`` matrix the fused parameter holds, so results are bit-identical."""

    def __init__(self, experts: list[tuple], act_fn):
        super().__init__()
        self.held, self.act_fn = experts, act_fn
        self.num_experts = len(experts)

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up ``[2I, H]``, down ``[H, I]``) of expert ``e`` in float32."""
        gate, up, down = self.held[e]
        return torch.cat([gate.float(), up.float()]), down.float()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx[0])
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate_up, down = self.weights(expert_idx)
            gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, down)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


def hold_modules(layer, state: dict) -> dict:
    """Put the held weights of ``state`` (layer-relative names) into ``layer`` (built on the meta device):
    linears become :class:`HeldLinear` (with their bias), per-expert weights one :class:`HeldExperts` per
    experts module; a held weight of any other module is upcast and assigned. Returns the plain tensors
    left for ``load_state_dict``."""
    experts: dict[str, dict] = {}
    linears: dict[str, Held] = {}
    plain = {n: v for n, v in state.items() if not is_held(v)}
    for name, value in state.items():
        if not is_held(value):
            continue
        m = EXPERT_WEIGHT.match(name)
        if m:
            experts.setdefault(m["prefix"], {})[(int(m["e"]), m["kind"])] = value
        elif name.endswith(".weight") and isinstance(layer.get_submodule(name.removesuffix(".weight")), nn.Linear):
            linears[name.removesuffix(".weight")] = value
        else:
            plain[name] = value.float()
    for module_name, value in linears.items():
        linear = layer.get_submodule(module_name)
        bias = plain.pop(module_name + ".bias", None)
        _set_submodule(layer, module_name, HeldLinear(value, linear.in_features, linear.out_features, bias))
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        per_expert = [(parts[(e, "gate_proj")], parts[(e, "up_proj")], parts[(e, "down_proj")]) for e in range(count)]
        _set_submodule(layer, prefix, HeldExperts(per_expert, layer.get_submodule(prefix).act_fn))
    return plain


def _set_submodule(layer, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, module)
