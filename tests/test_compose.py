"""A partitioned bundle whose expert partitions are all resident runs as one graph composed of its graphs
(dsedge.runtime.compose): the numbers and tokens of the graph-by-graph run, one session run per forward pass,
both ways validated at export; a budget that cannot hold every partition runs graph by graph."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsedge.compress.pipeline import compress
from dsedge.export.bundle import export_bundle
from dsedge.manifest import BundleError
from dsedge.runtime import load_bundle
from dsedge.runtime.compose import Composer, NotComposable, Stage
from dsedge.runtime.speculative import configure

# every family and every expert path: fused QMoE layer graphs (int8, int4 at widths it takes), per-partition
# dispatch summed in the graph (fp32, and int4 where QMoE does not fit), the float16 residual sum, dense trunks
CASES = [("v3", "int8"), ("v2", "fp32"), ("v2_lite", "int4"), ("v3", "fp16"), ("qwen2", "fp32"), ("llama", "int4")]
PROMPT = [5, 9, 13, 2, 7, 11, 3]


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    cache = {}

    def get(variant: str, precision: str, **kwargs):
        key = (variant, precision, tuple(sorted(kwargs.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"compose-{variant}-{precision}")
            source = tiny_checkpoint(variant, **kwargs)
            if precision in ("int8", "int4"):
                compress(source, root / "ckpt", recipe=precision, calib_tokens=64, evaluate=False)
                source = root / "ckpt"
            report = export_bundle(source, root / "b", max_context=48, layout="partitioned", experts_per_partition=2,
                                   dtype="fp16" if precision == "fp16" else "fp32")
            cache[key] = (root / "b", report)
        return cache[key]

    return get


@pytest.mark.parametrize(("variant", "precision"), CASES, ids=[f"{v}-{p}" for v, p in CASES])
def test_the_composed_graph_runs_what_the_graphs_run_one_by_one(built, variant, precision):
    bundle, report = built(variant, precision)
    names = {c["name"]: c["passed"] for c in report.validation}
    assert names["prefill"] and names["partitions.prefill"] and names["partitions.layer_0"]  # both ways, at export
    assert all(names.values())
    whole, layered = load_bundle(bundle), load_bundle(bundle, compose=False)
    assert whole.decoder is not None and not whole.traces_layers
    assert layered.decoder is None and layered.traces_layers
    atol = 1e-3 if precision == "fp16" else 1e-5
    np.testing.assert_allclose(whole.logits(PROMPT), layered.logits(PROMPT), rtol=0, atol=atol)
    assert whole.greedy(PROMPT, 10) == layered.greedy(PROMPT, 10)
    prompts = [PROMPT, PROMPT[:3]]
    assert whole.greedy_batch(prompts, 6) == layered.greedy_batch(prompts, 6)  # left padding, batch 2
    whole.timers.reset()
    whole.greedy(PROMPT, 4)
    assert whole.timers.calls == {"decoder (composed)": 4}  # prefill + 3 decode steps: one run each
    if whole.partitions_by_layer:  # every routed expert counted as a resident hit
        assert whole.experts.stats.hits > 0 and whole.experts.stats.misses == 0


def test_a_budget_that_evicts_runs_graph_by_graph_and_one_that_holds_all_composes(built):
    bundle, _ = built("v3", "int8")
    ranking = load_bundle(bundle, compose=False).manifest.contract.placement.ranking
    tight = load_bundle(bundle, memory_budget_bytes=2 * max(p.bytes for p in ranking))
    assert tight.decoder is None and tight.experts.stats.misses == 0
    roomy = load_bundle(bundle, memory_budget_bytes=sum(p.bytes for p in ranking) * 4 + 2**30)
    assert roomy.decoder is not None
    assert tight.greedy(PROMPT, 8) == roomy.greedy(PROMPT, 8)
    assert tight.experts.stats.misses > 0


def test_the_mtp_draft_reads_the_composed_graphs_final_hidden(built):
    bundle, _ = built("v3", "fp32", mtp=True)
    whole = load_bundle(bundle)
    assert whole.decoder is not None
    plain = load_bundle(bundle, compose=False).greedy(PROMPT, 12)
    configure(whole, "mtp", 1)
    result = whole.generate(PROMPT, max_new_tokens=12, temperature=0.0)
    assert result.token_ids[:len(plain)] == plain[:len(result.token_ids)]  # (it may stop at an eos)
    assert sum(whole.speculation.stats.drafted) > 0  # the draft ran, on the composed graph's final_hidden


def test_a_changed_stage_graph_is_refused_before_composing(built, tmp_path):
    import shutil

    bundle, _ = built("v2", "fp32")
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    layer = copy / "graphs" / "layer.1.onnx"
    raw = bytearray(layer.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    layer.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256|changed|hash"):
        load_bundle(copy)


def test_a_graph_with_a_subgraph_is_not_composed():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=then)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    with pytest.raises(NotComposable, match="graph"):
        Composer(set()).add(Stage("layers.0", model.SerializeToString(), "graphs"))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_tied_head_reads_the_preludes_matrix_once_in_the_composed_graph(built, precision):
    """Stages that reference the same bytes of the same file (a tied head and the prelude's embedding) share
    one initializer in the composed graph: the matrix is loaded once, not once per stage."""
    bundle, _ = built("qwen2", precision, tied=True)
    engine = load_bundle(bundle)
    from dsedge.runtime.partitioned import PartitionedEngine

    model = onnx.load_from_string(_composed_bytes(engine, PartitionedEngine))
    matrices = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
                and t.name.split("/")[-1] in ("model.embed_tokens.weight", "model.embed_tokens.qweight",
                                              "lm_head.weight", "lm_head.qweight")]
    assert len(matrices) == 1 and matrices[0].startswith("prelude/")
    layered = load_bundle(bundle, compose=False)
    np.testing.assert_allclose(engine.logits(PROMPT), layered.logits(PROMPT), rtol=0, atol=1e-5)
    assert engine.greedy(PROMPT, 8) == layered.greedy(PROMPT, 8)


def test_composed_model_is_a_closed_onnx_graph_with_bundle_relative_locations(built):
    """The composer edits protobuf at the wire level (the runtime has no onnx package): the onnx package parses
    its output; every node reads a value defined before it; every external location is relative to the bundle
    root; node names are unique and carry their stage (the node profiler's layer split)."""
    bundle, _ = built("v3", "int8")
    engine = load_bundle(bundle)
    from dsedge.runtime.partitioned import PartitionedEngine

    model = onnx.load_from_string(_composed_bytes(engine, PartitionedEngine))
    defined = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    assert {v.name for v in model.graph.input} == {"input_ids", "position_ids", "attention_mask", "logits_from",
                                                     *(f"past.{i}.latent" for i in range(3))}
    for node in model.graph.node:  # in order: the stages were appended in the engine's order
        assert all(not v or v in defined for v in node.input), node.name
        defined |= set(node.output)
    assert {v.name for v in model.graph.output} <= defined
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations and all(loc.startswith("graphs/") and (bundle / loc).is_file() for loc in locations)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    assert {n.name.split("/")[0] for n in model.graph.node} >= {"prelude", "layers.0", "layers.1", "layers.1.experts",
                                                                "head"}


def _composed_bytes(engine, cls) -> bytes:
    captured = {}
    original = cls.session

    def capture(self, graph, model=None, config=None):
        if model is not None:
            captured["model"] = model
        return original(self, graph, model, config)

    cls.session = capture
    try:
        cls(engine.manifest, engine.session_config, whole_config=engine.session_config)
    finally:
        cls.session = original
    return captured["model"]


def test_loading_a_composed_bundle_imports_no_onnx_or_torch(built):
    bundle, _ = built("v3", "int8")
    code = ("import sys\nfrom dsedge.runtime import load_bundle\n"
            f"engine = load_bundle({str(bundle)!r})\nassert engine.decoder is not None\n"
            "print(engine.greedy([5, 6, 7], 3))\n"
            "heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
