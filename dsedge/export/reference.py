"""The PyTorch reference for validation: transformers' own class, loaded with weights from our reader.

Loading through our reader (rather than ``from_pretrained``) gives the same reference for bf16 and FP8
checkpoints: FP8 blocks are dequantized exactly as the export sees them, and MTP tensors are skipped.
"""

from __future__ import annotations

import copy

from dsedge.models.checkpoint import Checkpoint
from dsedge.models.experts import fuse_experts

_DROP_KEYS = ("quantization_config", "auto_map")


def reference_model(ckpt: Checkpoint):
    """transformers' model class for the checkpoint's config, weights from ``ckpt`` in float32, eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config_dict = {k: v for k, v in copy.deepcopy(ckpt.spec.config).items() if k not in _DROP_KEYS}
    config = transformers.AutoConfig.for_model(**config_dict)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True swaps our tensors in instead of copying them, so the reference costs one model, not two.
    result = model.load_state_dict(fuse_experts(ckpt.state_dict()), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"reference weights do not fit transformers' {type(model).__name__}: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
