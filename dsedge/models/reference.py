"""transformers as the reference: its own model class for a checkpoint, loaded three ways.

* :func:`reference_model` — the class for the checkpoint's config, with weights from *our* reader.
  Scripts and tests use it: bf16, FP8 and compressed checkpoints get the same reference, because FP8 blocks
  and quantized weights are dequantized exactly as the export sees them (MTP tensors skipped).
* :class:`StreamedReference` — the same classes one decoder layer at a time (transformers' ``DecoderLayer``
  with only that layer's weights): export validation carries hidden states through it, so a validated
  export never holds more than one reference layer.
* :func:`load_reference_model` — transformers' own ``from_pretrained`` (never remote code): the
  independent oracle that tests check our reader against, and what evaluation scores.

:func:`on_disk_state_dict` maps a transformers model's tensors back to checkpoint names.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from dsedge.models.checkpoint import Checkpoint
from dsedge.models.experts import fuse_experts
from dsedge.models.registry import ARCHITECTURES

# Dropped before building transformers' config: FP8 and pack-quantized weights are dequantized by our
# reader, and remote code is never used.
DROP_CONFIG_KEYS = ("quantization_config", "auto_map")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def reference_model(ckpt: Checkpoint):
    """transformers' model class for the checkpoint's config, weights from ``ckpt`` in float32, eval mode."""
    import torch  # optional heavy dependencies: the reader itself works without them
    import transformers

    quiet_transformers()
    config_dict = {k: v for k, v in copy.deepcopy(ckpt.spec.config).items() if k not in DROP_CONFIG_KEYS}
    config = transformers.AutoConfig.for_model(**config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True swaps our tensors in instead of copying them, so the reference costs one model, not two.
    result = model.load_state_dict(fuse_experts(ckpt.state_dict()), strict=False, assign=True)
    missing = tied_missing(model, ckpt.spec, result.missing_keys)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"reference weights do not fit transformers' {type(model).__name__}: missing "
                           f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def tied_missing(model, spec, missing: list[str]) -> list[str]:
    """``missing`` less the head when the config ties it to the embeddings (``tie_word_embeddings``: the
    checkpoint stores the matrix once). ``assign=True`` replaced the embedding parameter, so the head is
    pointed at the loaded one again (``tie_weights``), never left at its random init."""
    if not spec.tie_word_embeddings:
        return list(missing)
    model.tie_weights()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        head.weight = embed.weight
    return [k for k in missing if k != "lm_head.weight"]


def load_reference_model(path: str | Path, dtype: str = "float32"):
    """transformers' own model class for a checkpoint directory, loaded by ``from_pretrained``, eval mode."""
    import torch  # optional heavy dependencies: the reader itself works without them
    import transformers

    quiet_transformers()  # the MTP layer is reported as "unexpected": that is expected
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                              trust_remote_code=False)
    return model.eval()


def quiet_transformers() -> None:
    """transformers says nothing on its own: errors only, and no tqdm bar of its own ("Loading weights") on
    dsedge's stderr, where dsedge.progress draws the bars."""
    import transformers  # optional heavy dependency

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def on_disk_state_dict(model) -> dict:
    """The model's tensors under checkpoint names: transformers 5 fuses experts only in memory."""
    out = {}
    for name, tensor in model.state_dict().items():
        match = _FUSED.match(name)
        if not match:
            out[name] = tensor
            continue
        prefix = match["prefix"]
        for j, expert in enumerate(tensor):
            if match["kind"] == "down_proj":
                out[f"{prefix}.{j}.down_proj.weight"] = expert
            else:  # gate rows then up rows
                gate, up = expert.chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.{j}.up_proj.weight"] = up
    return out


EMBED = "model.embed_tokens.weight"


class StreamedReference:
    """transformers' own model, one decoder layer at a time: what export validation compares a bundle with.

    Each layer is transformers' ``DecoderLayer`` class for the architecture, built on the meta device and given
    only that layer's tensors (read from the checkpoint tensor by tensor, FP8 and quantized weights
    dequantized as export sees them), run once over the carried hidden states, then dropped; the embedding
    reads only the rows it needs and the head runs last. So the reference never holds more than one layer
    (plus the embedding or head matrix while they run), whatever the model's size. MTP layers are skipped.
    """

    def __init__(self, ckpt: Checkpoint, embedding=None):
        """``embedding`` replaces the checkpoint's: an object whose ``row_blocks()`` yields ``(first row, float32
        block)`` — export's ``RequantizedEmbedding``, the numbers the bundle's GatherBlockQuantized returns and
        its tied head reads."""
        import importlib

        import transformers  # optional heavy dependencies: the reader itself works without them

        quiet_transformers()
        self.ckpt, self.spec, self.embedding = ckpt, ckpt.spec, embedding
        config_dict = {k: v for k, v in copy.deepcopy(ckpt.spec.config).items() if k not in DROP_CONFIG_KEYS}
        self.config = transformers.AutoConfig.for_model(**config_dict)
        self.config._attn_implementation = "sdpa"  # what the full model runs by default
        model_type = self.config.model_type
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        stem = ARCHITECTURES[model_type].hf_class_stem
        self.layer_class = getattr(module, f"{stem}DecoderLayer")
        self.rotary_class = getattr(module, f"{stem}RotaryEmbedding")
        self.norm_class = getattr(module, f"{stem}RMSNorm")

    @property
    def num_layers(self) -> int:
        return self.spec.num_hidden_layers

    def embed(self, token_ids):
        """Hidden states ``[N, S, H]`` (float32 torch) of equal-length token sequences ``[N, S]``: the rows the
        prompts use, gathered block by block (the matrix is never whole in float32)."""
        import torch  # optional heavy dependency

        ids = torch.as_tensor(token_ids, dtype=torch.long)
        flat = ids.reshape(-1)
        out = None
        for start, block in self._row_blocks(EMBED):
            if out is None:
                out = torch.zeros(flat.numel(), block.shape[1])
            inside = (flat >= start) & (flat < start + block.shape[0])
            if inside.any():
                out[inside] = block[flat[inside] - start]
        return out.reshape(*ids.shape, -1)

    def _row_blocks(self, name: str):
        """``(first row, float32 block)`` of the embedding or head: from the override when it replaces the
        embedding, else from the checkpoint."""
        if name == EMBED and self.embedding is not None:
            yield from self.embedding.row_blocks()
        else:
            yield from self.ckpt.row_blocks(name)

    def layer(self, index: int):
        """transformers' decoder layer ``index`` holding the checkpoint's weights (float32, eval mode)."""
        import torch  # optional heavy dependency

        prefix = f"model.layers.{index}."
        state = {n.removeprefix(prefix): t for n, t in self.ckpt.read_layer(index).items()}
        with torch.device("meta"):
            layer = self.layer_class(self.config, layer_idx=index)
        layer.load_state_dict(fuse_experts(state), strict=True, assign=True)
        return layer.eval()

    def run_layer(self, index: int, hidden):
        """``hidden`` ``[N, S, H]`` through layer ``index`` (causal, positions 0..S-1); the layer is freed after."""
        import torch  # optional heavy dependency

        seq = hidden.shape[1]
        positions = torch.arange(seq)[None]
        cos_sin = self.rotary_class(self.config)(hidden, positions)
        upper = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        mask = torch.zeros(seq, seq).masked_fill(upper, torch.finfo(torch.float32).min)[None, None]
        layer = self.layer(index)
        with torch.no_grad():
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        del layer
        return out

    def logits(self, hidden):
        """The final norm and LM head (the embedding matrix when tied) on ``hidden`` ``[N, S, H]``, the head a
        block of vocabulary rows at a time."""
        import torch  # optional heavy dependency

        names = set(self.ckpt.non_layer_names())
        norm = self.norm_class(hidden.shape[-1], eps=self.spec.rms_norm_eps)
        head = "lm_head.weight" if "lm_head.weight" in names else EMBED
        with torch.no_grad():
            norm.weight.copy_(self.ckpt.read("model.norm.weight"))
            normed = norm(hidden)
            return torch.cat([torch.nn.functional.linear(normed, block) for _, block in self._row_blocks(head)],
                             dim=-1)
