"""One decoder layer at a time, as transformers' own class: the forward compress calibrates and propagates with.

The layer is built on the meta device and given the checkpoint's tensors by assignment, its matmul weights
held as stored and upcast one module / one expert at a time (:mod:`.held`), so it costs the layer's stored
size, not its float32 size; the rotary embedding, final norm and head come from the same transformers
module, so a streamed pass over all layers reproduces the full model's logits (tests check that).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any

from dsedge.compress.held import hold_modules
from dsedge.errors import ConfigError
from dsedge.models.experts import fuse_experts
from dsedge.models.reference import DROP_CONFIG_KEYS
from dsedge.models.registry import ARCHITECTURES


def hf_config(config_dict: dict[str, Any], **overrides):
    """transformers' config object for a checkpoint's config.json (plus ``overrides``), SDPA attention."""
    import transformers  # heavy: imported only when compress builds a layer

    transformers.logging.set_verbosity_error()
    data = {k: v for k, v in copy.deepcopy(config_dict).items() if k not in DROP_CONFIG_KEYS} | overrides
    config = transformers.AutoConfig.for_model(**data)
    config._attn_implementation = "sdpa"
    return config


@dataclass
class Classes:
    """transformers' classes for one architecture."""

    decoder_layer: type
    rotary: type
    norm: type


def classes_for(model_type: str) -> Classes:
    """transformers' classes for ``model_type``, named by its registry entry (models/registry.py)."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ConfigError(f"compress does not support model_type {model_type!r}",
                          hint=f"supported: {', '.join(ARCHITECTURES)}")
    stem = arch.hf_class_stem
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return Classes(getattr(module, f"{stem}DecoderLayer"), getattr(module, f"{stem}RotaryEmbedding"),
                   getattr(module, f"{stem}RMSNorm"))


def build_layer(classes: Classes, config, index: int, state: dict):
    """transformers' decoder layer ``index`` holding ``state`` (layer-relative, per-expert names), eval mode.

    Entries that are held weights (:mod:`.held`: stored bytes or packed integers, upcast per call) go into
    :class:`~.held.HeldLinear` / :class:`~.held.HeldExperts` modules; plain tensors are assigned as
    parameters. ``state`` is consumed: each entry is dropped once the layer holds it, so the weights exist once."""
    import torch  # heavy: imported only when compress runs a layer

    with torch.device("meta"):
        layer = classes.decoder_layer(config, layer_idx=index)
    plain = hold_modules(layer, state)
    state.clear()
    layer.load_state_dict(fuse_experts(plain), strict=True, assign=True)
    return layer.eval()


class LayerRunner:
    """Runs hidden states ``[N, S, H]`` through decoder layers in batches of sequences, causally masked."""

    def __init__(self, classes: Classes, config, seq_len: int, batch_size: int = 8):
        import torch  # heavy: imported only when compress runs a layer

        self.batch_size = batch_size
        self.position_ids = torch.arange(seq_len)[None]  # [1, S]
        rotary = classes.rotary(config)
        dummy = torch.zeros(1, seq_len, config.hidden_size)
        self.position_embeddings = rotary(dummy, self.position_ids)  # (cos, sin), shared by every layer
        upper = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
        self.mask = torch.zeros(seq_len, seq_len).masked_fill(upper, torch.finfo(torch.float32).min)[None, None]

    def run(self, layer, hidden):
        """``layer`` applied to every sequence of ``hidden`` ``[N, S, H]``; returns a new ``[N, S, H]``."""
        import torch  # heavy: imported only when compress runs a layer

        out = torch.empty_like(hidden)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], self.batch_size):
                chunk = hidden[start:start + self.batch_size]
                out[start:start + len(chunk)] = layer(chunk, attention_mask=self.mask, position_ids=self.position_ids,
                                                      position_embeddings=self.position_embeddings)
        return out


def final_logits(hidden, norm_weight, head_weight, eps: float, norm_class):
    """Logits ``[N, S, V]`` of the final hidden states through the model's norm and LM head."""
    import torch  # heavy: imported only when compress runs a layer

    with torch.no_grad():
        return torch.nn.functional.linear(final_norm(hidden, norm_weight, eps, norm_class), head_weight)


def final_norm(hidden, norm_weight, eps: float, norm_class):
    """The model's final norm applied to ``hidden`` (what the LM head reads)."""
    import torch  # heavy: imported only when compress runs a layer

    norm = norm_class(hidden.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(norm_weight)
        return norm(hidden)
