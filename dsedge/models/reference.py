"""transformers as the reference: its own model class for a checkpoint, loaded two ways.

* :func:`reference_model` — the class for the checkpoint's config, with weights from *our* reader.
  Export validation uses it: bf16, FP8 and compressed checkpoints get the same reference, because FP8
  blocks and quantized weights are dequantized exactly as the export sees them (MTP tensors skipped).
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
