"""A PyTorch reference of DeepSeek-V3's multi-token-prediction (MTP) module, independent of the export code.

Written from the DeepSeek-V3 technical report (arXiv 2412.19437, §2.2 "Multi-Token Prediction") and the
checkpoint's README_WEIGHTS.md (github.com/deepseek-ai/DeepSeek-V3): module k = 1 sits at layer index
``num_hidden_layers`` and holds ``enorm``, ``hnorm``, ``eh_proj`` [H, 2H], one ordinary decoder layer (MLA and
its own MoE), ``shared_head.norm`` and copies of the shared ``embed_tokens`` and output head
(``shared_head.head``). For position i it combines the main model's final representation h_i with the
embedding of the next token t_{i+1} and predicts t_{i+2}:

    h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])      # embedding half first, as the released eh_proj
    h''  = TransformerBlock(h'_{1..i})                     #   expects (vLLM's deepseek_mtp.py concatenates so)
    logits_i = head(shared_head.norm(h''_i))

The block is transformers' own ``DeepseekV3DecoderLayer`` (transformers is the project's reference for the
model's layers), fed causally over the whole sequence without a cache; h_i is the main model's output after
its final norm (what vLLM's MTP proposer passes as ``previous_hidden_states``: DeepseekV2Model.forward
returns ``self.norm``'s output; DeepSeek's own inference/model.py has no MTP and convert.py drops layer 61).
The recursion for k > 1 feeds h''_i as the next step's h_i.

torch and transformers are imported here: testing code, never the runtime.
"""

from __future__ import annotations

import copy

import torch

from dsedge.models.checkpoint import Checkpoint
from dsedge.models.experts import fuse_experts
from dsedge.models.reference import DROP_CONFIG_KEYS

OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
       "embed_tokens.weight")


class MTPReference(torch.nn.Module):
    """MTP module ``depth`` (0 = the first) of a checkpoint with ``num_nextn_predict_layers`` ≥ 1, float32."""

    def __init__(self, checkpoint, depth: int = 0):
        super().__init__()
        import transformers
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RotaryEmbedding,
        )

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        spec = ckpt.spec
        if depth >= spec.num_mtp_layers or not ckpt.has_mtp:
            raise ValueError(f"{ckpt.path} has no MTP module {depth}")
        layer = spec.num_hidden_layers + depth
        prefix = f"model.layers.{layer}."
        config_dict = {k: v for k, v in copy.deepcopy(spec.config).items() if k not in DROP_CONFIG_KEYS}
        config = transformers.AutoConfig.for_model(**config_dict)
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"  # a standalone layer: no model to dispatch it
        weights = {name[len(prefix):]: t for name, t in ckpt.read_layer(layer, torch.float32).items()}
        main = ckpt.read_many(["model.embed_tokens.weight", "lm_head.weight"], torch.float32)
        self.embed = weights.get("embed_tokens.weight", main["model.embed_tokens.weight"])
        self.head = weights.get("shared_head.head.weight", main["lm_head.weight"])
        self.enorm, self.hnorm = weights["enorm.weight"], weights["hnorm.weight"]
        self.eh_proj, self.head_norm = weights["eh_proj.weight"], weights["shared_head.norm.weight"]
        self.eps = spec.rms_norm_eps
        self.block = DeepseekV3DecoderLayer(config, layer_idx=layer)
        block_state = fuse_experts({k: v for k, v in weights.items() if k not in OWN})
        self.block.load_state_dict(block_state, strict=True)
        self.block.eval()
        self.rotary = DeepseekV3RotaryEmbedding(config)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    @torch.no_grad()
    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_ids`` [B, T] (t_{i+1}), ``hidden`` [B, T, H] (the main model's h_i) → (logits [B, T, V] for
        t_{i+2}, the module's own output h''_i [B, T, H] for the next depth)."""
        batch, length = next_ids.shape
        positions = torch.arange(length).expand(batch, length) if positions is None else positions
        joined = torch.cat([self._rms(self.embed[next_ids], self.enorm), self._rms(hidden.float(), self.hnorm)], -1)
        x = joined @ self.eh_proj.T
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(batch, 1, length, length)
        out = self.block(x, attention_mask=causal, position_ids=positions,
                         position_embeddings=self.rotary(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        return self._rms(out, self.head_norm) @ self.head.T, out
