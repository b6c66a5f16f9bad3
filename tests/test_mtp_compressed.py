"""`dsedge compress` keeps DeepSeek-V3's MTP layer and compresses it by the recipe (its decoder block like any MoE
layer, eh_proj like a linear, its norms float, the embedding and head shared with the main model); export reads
the quantized module into a draft graph with MatMulNBits/QMoE; the draft matches the reference module on the
dequantized weights, greedy `--speculative mtp` equals plain greedy, and transformers still loads the output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsedge.compress.pipeline import compress
from dsedge.export.bundle import export_bundle
from dsedge.models.checkpoint import Checkpoint
from dsedge.runtime import load_bundle
from dsedge.runtime.decode import generate_step
from dsedge.runtime.speculative import configure
from dsedge.testing.mtp_reference import MTPReference

FAST = {"calib_tokens": 128, "heldout_tokens": 128, "seq_len": 64}
RECIPES = {"int4": ("int4-g32", "gptq"), "int8": ("int8", "rtn")}
PROMPT = [5, 9, 13, 21, 5, 9, 13, 21, 5, 9, 40, 41, 5, 9, 13]
# Draft logits vs the reference module on the dequantized weights: MatMulNBits at accuracy level 4 quantizes
# its activations to int8 per block, so the error is the activations' (~1% of the logits' range), not zero.
DRAFT_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    return tiny_checkpoint("v3", mtp=True)


@pytest.fixture(scope="module", params=sorted(RECIPES))
def compressed(source, tmp_path_factory, request):
    recipe, method = RECIPES[request.param]
    out = tmp_path_factory.mktemp(f"mtp-{request.param}") / "c"
    report = compress(source, out, recipe=recipe, method=method, **FAST)
    return out, report


def test_compress_keeps_the_mtp_layer_by_the_recipe(source, compressed):
    out, report = compressed
    ckpt = Checkpoint(out)
    ckpt.validate()
    spec = ckpt.spec
    mtp = spec.num_hidden_layers
    p = f"model.layers.{mtp}."
    assert ckpt.has_mtp and json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any("MTP" in w for w in report.warnings)
    quantized = set(ckpt.quantization)
    assert p + "eh_proj" in quantized and p + "self_attn.q_a_proj" in quantized
    assert {f"{p}mlp.experts.{e}.down_proj" for e in range(spec.moe.n_routed_experts)} <= quantized
    assert p + "mlp.shared_experts.up_proj" in quantized and p + "mlp.gate" not in quantized
    for norm in ("enorm", "hnorm", "shared_head.norm", "input_layernorm"):  # floats, as stored
        assert ckpt.tensors[f"{p}{norm}.weight"].dtype in ("BF16", "F16", "F32"), norm
    # the module's copies of the embedding and head are the main ones: not written again
    assert p + "embed_tokens.weight" not in ckpt.tensors and p + "shared_head.head.weight" not in ckpt.tensors
    record = next(r for r in report.layers if r["layer"] == mtp)
    assert record["mtp"] and record["moe"] and "self_attn.q_a_proj" in record["modules"]
    # a compressed layer is close to the original: the dequantized block weights track the source
    original = Checkpoint(source).read(p + "eh_proj.weight").float()
    got = ckpt.read(p + "eh_proj.weight").float()
    assert torch.linalg.norm(got - original) < 0.2 * torch.linalg.norm(original)


@pytest.fixture(scope="module", params=["monolithic", "partitioned"])
def bundle(compressed, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"mtpq-{request.param}") / "b"
    export_bundle(compressed[0], out, max_context=64, layout=request.param)  # the main graph validated
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_export_reads_the_quantized_mtp_module(compressed, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["mtp"] == {"in_checkpoint": True, "exported": True}
    draft_ops = _ops(bundle / "graphs" / "draft.onnx")
    assert "MatMulNBits" in draft_ops
    # the module's experts as a monolithic decoder's MoE layers get them: one QMoE node when their layout
    # allows it (int8 here; the fixture's widths are not multiples of 32, so int4-g32 stays per expert)
    int8 = {s.bits for s in Checkpoint(compressed[0]).quantization.values()} == {8}
    assert ("QMoE" in draft_ops) == int8
    if manifest["layout"] == "monolithic":
        assert ("QMoE" in _ops(bundle / "graphs" / "decoder.onnx")) == int8


def test_quantized_draft_matches_the_reference_module(compressed, bundle):
    reference = MTPReference(compressed[0])  # on the dequantized weights the checkpoint stores
    session = ort.InferenceSession(str(bundle / "graphs" / "draft.onnx"))
    width = session.get_inputs()[-1].shape[-1]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, reference.embed.shape[0], size=(1, 9))
    hidden = rng.normal(size=(1, 9, reference.embed.shape[1])).astype(np.float32)
    logits, own = (t.numpy() for t in reference(torch.tensor(ids), torch.tensor(hidden)))
    feeds = {"input_ids": ids, "final_hidden": hidden, "position_ids": np.arange(9)[None],
             "attention_mask": np.ones((1, 9), np.int64), "past.0.latent": np.zeros((1, 0, width), np.float32)}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    scale = np.abs(logits).max()
    assert scale > 0.1
    assert np.abs(got["logits"] - logits).max() <= DRAFT_TOLERANCE * scale
    assert np.abs(got["draft_hidden"] - own).max() <= DRAFT_TOLERANCE * np.abs(own).max()
    assert (got["logits"].argmax(-1) == logits.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_mtp_greedy_equals_greedy_on_compressed(bundle, draft_tokens):
    engine = load_bundle(bundle)
    plain = [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=20)]
    speculation = configure(engine, "mtp", draft_tokens)
    assert [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=20)] == plain
    assert speculation.stats.forwards > 0 and len(speculation.stats.drafted) == draft_tokens


def test_transformers_loads_the_compressed_checkpoint_with_its_mtp_layer(source, compressed):
    """transformers builds no MTP module and skips the layer on load; the held-out perplexity is the report's."""
    from dsedge.compress.calibration import load_calibration
    from dsedge.evaluation import evaluate_perplexity, torch_logits_fn
    from dsedge.models.reference import load_reference_model

    out, report = compressed
    model = load_reference_model(out)
    calibset = load_calibration(source / "tokenizer.json", None, **FAST)
    got = evaluate_perplexity(torch_logits_fn(model), calibset.heldout.reshape(-1).tolist(), window=64, batch_size=8)
    assert got.perplexity == pytest.approx(report.quality["compressed"]["perplexity"], rel=1e-3)
