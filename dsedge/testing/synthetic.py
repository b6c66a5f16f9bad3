"""Large synthetic checkpoints (constant weights) for memory and throughput measurements."""

from __future__ import annotations

import json
from pathlib import Path


def write_sharded_dense(path: Path, *, hidden: int = 1024, inter: int = 2752, layers: int = 8, vocab: int = 4096,
                        kv: int = 256, shards: int = 4) -> int:
    """A Llama-layout checkpoint split into ``shards`` files; returns its bytes (fp32)."""
    import torch
    from safetensors.torch import save_file

    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 16 * kv // hidden, "vocab_size": vocab,
              "tie_word_embeddings": False}
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    names = list(shapes)
    per_shard, weight_map = -(-len(names) // shards), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[s * per_shard:(s + 1) * per_shard]
        save_file({n: torch.full(shapes[n], 0.01) for n in chunk}, str(path / file))
        weight_map.update(dict.fromkeys(chunk, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    return sum(4 * _numel(s) for s in shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
