"""Meta-tests: a registered architecture or routing variant without a test fails here; lean imports."""

import subprocess
import sys

import test_checkpoint

from dsedge.models.registry import ARCHITECTURES, spec_from_config
from dsedge.models.spec import ROUTING_VARIANTS
from dsedge.testing.tiny import tiny_config


def covered_specs():
    return [(spec_from_config(tiny_config(v, **{k: kw[k] for k in ("mtp", "fp8") if k in kw})), kw)
            for v, kw in test_checkpoint.CHECKPOINT_CASES]


def test_every_architecture_has_reader_tests():
    tested = {spec.model_type for spec, _ in covered_specs()}
    assert set(ARCHITECTURES) <= tested, f"untested architectures: {set(ARCHITECTURES) - tested}"


def test_every_routing_variant_and_checkpoint_form_is_tested():
    specs = covered_specs()
    assert {s.moe.routing for s, _ in specs if s.moe} == set(ROUTING_VARIANTS)
    assert any(kw.get("mtp") for _, kw in specs)
    assert any(kw.get("num_shards", 1) > 1 for _, kw in specs)
    assert any(kw.get("style") == "transformers" for _, kw in specs)
    assert any(s.mla and s.mla.q_lora_rank is None for s, _ in specs)  # V2-Lite's plain q_proj


def test_lean_imports():
    """The runtime (retrieval included), targets and plan never import torch (DESIGN.md §3)."""
    code = ("import sys, dsedge.runtime, dsedge.targets, dsedge.planning, dsedge.inspection, dsedge.cli\n"
            "import dsedge.retrieval, dsedge.retrieval.rag, dsedge.retrieval.index, dsedge.retrieval.embedder\n"
            "import dsedge.retrieval.chunking, dsedge.retrieval.convert, dsedge.cli_index\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
