"""Architecture specs from config.json and streamed checkpoint reading."""

from dsedge.models.registry import ARCHITECTURES, load_spec, spec_from_config
from dsedge.models.spec import MLASpec, ModelSpec, MoESpec, RopeSpec, TensorSpec

__all__ = ["ARCHITECTURES", "MLASpec", "ModelSpec", "MoESpec", "RopeSpec", "TensorSpec", "load_spec",
           "spec_from_config"]
