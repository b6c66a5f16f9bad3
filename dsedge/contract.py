"""The graph contract: each role's inputs and outputs, declared once. Stdlib only (the runtime imports it).

Export builds every graph's inputs and outputs from these declarations (``GraphBuilder.declare``) and writes
them into the manifest; the runtime builds its feeds and output lists from the manifest's copy. So a tensor
name is spelled here and nowhere else, as optimum's exporters declare a model's inputs/outputs once per
architecture.

Dims are ints or symbols: ``B`` batch, ``T`` new tokens, ``S`` cached tokens, ``S_plus_T`` both, ``N`` rows
routed to experts (B·T), ``L`` positions with logits (T − logits_from), ``M`` a cache buffer's whole length:
a cache with ``M`` (GQA's key/value) is passed whole and its present is the same buffer with the new entries
written at S (the runtime binds both to one array); a cache with ``S`` (MLA's latent) is passed as the
filled prefix and returns only the new entries.
"""

from __future__ import annotations

from dataclasses import dataclass

# Graph roles. "draft": DeepSeek-V3's MTP module, the speculative-decoding draft (``draft_io``).
# "layer_experts": all routed experts of one layer as one graph (one QMoE), over the same external data as
# that layer's "experts" partitions: the runtime runs it instead of them when all of them are resident.
DECODER, PRELUDE, LAYER, EXPERTS, HEAD, DRAFT = "decoder", "prelude", "layer", "experts", "head", "draft"
LAYER_EXPERTS = "layer_experts"
ROLES = (DECODER, PRELUDE, LAYER, EXPERTS, HEAD, DRAFT, LAYER_EXPERTS)
EXPERT_ROLES = (EXPERTS, LAYER_EXPERTS)
TRUNK_ROLES = (PRELUDE, LAYER, HEAD)

# Tensor names.
INPUT_IDS, POSITION_IDS, ATTENTION_MASK = "input_ids", "position_ids", "attention_mask"
HIDDEN, COS, SIN, ALLOWED = "hidden", "cos", "sin", "allowed"
RESIDUAL, MOE_INPUT, EXPERT_IDS, EXPERT_WEIGHTS = "residual", "moe_input", "expert_ids", "expert_weights"
ROUTED, LOGITS = "routed", "logits"
# The main model's last hidden state after its final norm (decoder output when the model has an MTP module),
# and the MTP module's own output hidden state (the next draft depth's input).
FINAL_HIDDEN, DRAFT_HIDDEN = "final_hidden", "draft_hidden"
LOGITS_FROM = "logits_from"  # int64 [1]: the first new position whose logits are computed (prefill: T − 1)
PAST, PRESENT = "past", "present"

DTYPES = ("float32", "float16", "int64", "bool")
Dim = int | str


def past_name(layer: int | str, tensor: str) -> str:
    """Cache input of one layer: ``past.{layer}.{tensor}`` (tensor: latent, or key/value)."""
    return f"{PAST}.{layer}.{tensor}"


def present_name(layer: int | str, tensor: str) -> str:
    """The new tokens' cache entries a layer returns."""
    return f"{PRESENT}.{layer}.{tensor}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # one of DTYPES
    dims: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class GraphShapes:
    """What the signatures depend on: model sizes, the cache layout, and the activation precision."""

    layers: int
    hidden: int
    vocab: int
    rope_width: int  # cos/sin columns (half the rotary dim)
    top_k: int  # experts per token (0 for dense models)
    cache_tensors: tuple[str, ...]
    cache_dims: tuple[Dim, ...]  # with "S" for the cached length, or "M" for a whole buffer updated in place
    act: str = "float32"  # activations and cache: float32 or float16
    final_hidden: bool = False  # the decoder also returns FINAL_HIDDEN (models with an MTP draft module)


def _tokens() -> tuple[TensorSpec, ...]:
    return (TensorSpec(INPUT_IDS, "int64", ("B", "T")), TensorSpec(POSITION_IDS, "int64", ("B", "T")),
            TensorSpec(ATTENTION_MASK, "int64", ("B", "S_plus_T")))


def _pasts(s: GraphShapes, layer: int) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(past_name(layer, t), s.act, s.cache_dims) for t in s.cache_tensors)


def _presents(s: GraphShapes, layer: int) -> tuple[TensorSpec, ...]:
    dims = tuple("T" if d == "S" else d for d in s.cache_dims)  # only the new tokens' entries (or the M buffer)
    return tuple(TensorSpec(present_name(layer, t), s.act, dims) for t in s.cache_tensors)


def _logits(s: GraphShapes) -> TensorSpec:
    return TensorSpec(LOGITS, "float32", ("B", "L", s.vocab))  # always fp32: sampling reads it


def _logits_from() -> TensorSpec:
    """Logits for positions logits_from … T−1 only: a prefill needs the last (the head is ~27% of a
    512-token prefill's work on qwen2bench), validation all (0)."""
    return TensorSpec(LOGITS_FROM, "int64", (1,))


def _positional(s: GraphShapes) -> tuple[TensorSpec, ...]:
    return (TensorSpec(COS, s.act, ("B", "T", s.rope_width)), TensorSpec(SIN, s.act, ("B", "T", s.rope_width)),
            TensorSpec(ALLOWED, "bool", ("B", 1, "T", "S_plus_T")))


def _rows(s: GraphShapes) -> tuple[TensorSpec, ...]:
    """A MoE layer's rows and their routing, as the layer hands them to the expert partitions."""
    return (TensorSpec(MOE_INPUT, s.act, ("N", s.hidden)), TensorSpec(EXPERT_IDS, "int64", ("N", s.top_k)),
            TensorSpec(EXPERT_WEIGHTS, "float32", ("N", s.top_k)))


def decoder_io(s: GraphShapes) -> Signature:
    """The whole model: tokens and every layer's cache in; every layer's new entries, then logits, out."""
    pasts = tuple(p for i in range(s.layers) for p in _pasts(s, i))
    presents = tuple(p for i in range(s.layers) for p in _presents(s, i))
    hidden = (TensorSpec(FINAL_HIDDEN, s.act, ("B", "T", s.hidden)),) if s.final_hidden else ()
    return Signature(_tokens() + (_logits_from(),) + pasts, presents + (_logits(s),) + hidden)


def draft_io(s: GraphShapes) -> Signature:
    """The MTP module: at each position, the next token and the main model's FINAL_HIDDEN there, plus its own
    one-layer cache (``past.0.*``); out its new cache entries, logits for the token after next, DRAFT_HIDDEN."""
    inputs = _tokens() + (TensorSpec(FINAL_HIDDEN, s.act, ("B", "T", s.hidden)),) + _pasts(s, 0)
    logits = TensorSpec(LOGITS, "float32", ("B", "T", s.vocab))  # every position: a draft reads the last ones
    outputs = _presents(s, 0) + (logits, TensorSpec(DRAFT_HIDDEN, s.act, ("B", "T", s.hidden)))
    return Signature(inputs, outputs)


def prelude_io(s: GraphShapes) -> Signature:
    """Embedding and positions, shared by every layer."""
    return Signature(_tokens(), (TensorSpec(HIDDEN, s.act, ("B", "T", s.hidden)),) + _positional(s))


def layer_io(s: GraphShapes, layer: int, moe: bool) -> Signature:
    """One decoder layer without its routed experts (a MoE layer also returns its routed rows)."""
    inputs = (TensorSpec(HIDDEN, s.act, ("B", "T", s.hidden)),) + _positional(s) + _pasts(s, layer)
    outputs = _presents(s, layer) + (TensorSpec(RESIDUAL, s.act, ("B", "T", s.hidden)),)
    return Signature(inputs, outputs + (_rows(s) if moe else ()))


def experts_io(s: GraphShapes) -> Signature:
    """One partition's share of the routed experts, summed in fp32 by the runtime."""
    return Signature(_rows(s), (TensorSpec(ROUTED, "float32", ("N", s.hidden)),))


def head_io(s: GraphShapes) -> Signature:
    """Final norm and LM head; with an MTP draft module also the normed hidden state at every position."""
    hidden = (TensorSpec(FINAL_HIDDEN, s.act, ("B", "T", s.hidden)),) if s.final_hidden else ()
    return Signature((TensorSpec(HIDDEN, s.act, ("B", "T", s.hidden)), _logits_from()), (_logits(s),) + hidden)


# --- names ------------------------------------------------------------------------------------------
# Indices are zero-padded to the width of the largest one, so names (and the files named after them)
# sort in layer and expert order: layer.02 < layer.10.


def index_width(count: int) -> int:
    """Digits of the largest index among ``count`` (layer.0 … layer.9 → 1; 61 layers → 2)."""
    return len(str(max(count - 1, 0)))


def layer_graph_name(layer: int, layers: int) -> str:
    return f"layer.{layer:0{index_width(layers)}d}"


def layer_experts_name(layer: int, layers: int) -> str:
    """All routed experts of one layer as one graph, e.g. ``layer.02.experts``."""
    return f"{layer_graph_name(layer, layers)}.experts"


def partition_name(layer: int, first: int, last: int, layers: int, experts: int) -> str:
    """Experts [first, last) of one layer, e.g. ``layer.02.experts.004-007``."""
    width = index_width(experts)
    return f"{layer_graph_name(layer, layers)}.experts.{first:0{width}d}-{last - 1:0{width}d}"
