"""The shipped demo models (dsedge.demo) and the evaluation helper (dsedge.evaluation)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsedge.demo import DEMO_MODELS, heldout_path, model_path
from dsedge.errors import UserError
from dsedge.evaluation import (
    encode_text_file,
    evaluate_checkpoint,
    evaluate_perplexity,
    torch_logits_fn,
    unigram_perplexity,
)
from dsedge.sources import resolve_checkpoint

# Perplexity of each shipped model on SAMPLE_WINDOWS windows of 512 tokens spread evenly over the
# shipped held-out text (float32 compute), as recorded in dsedge/demo/MODEL_CARD.md. Retraining or
# re-saving a model changes these on purpose; anything else that changes them is a regression.
SAMPLE_WINDOWS, WINDOW = 8, 512
RECORDED_SAMPLE_PERPLEXITY = {"deepseek-v3-tiny": 36.8938, "qwen2-tiny": 37.7400}
MAX_SHIPPED_BYTES = 30_000_000


# ----------------------------------------------------------------------------- demo package


def test_model_path_resolves_every_demo_model():
    for name in DEMO_MODELS:
        assert (model_path(name) / "config.json").is_file()


def test_model_path_unknown_name_suggests_the_closest():
    with pytest.raises(UserError) as error:
        model_path("deepseek-v3-tin")
    assert "unknown demo model 'deepseek-v3-tin'" in error.value.what
    assert "did you mean 'deepseek-v3-tiny'" in error.value.hint
    with pytest.raises(UserError) as error:
        model_path("llama-70b")
    assert "qwen2-tiny" in error.value.hint  # no close match: the list of names


def test_resolve_checkpoint_prefers_a_local_directory(tmp_path, monkeypatch):
    assert resolve_checkpoint("qwen2-tiny") == model_path("qwen2-tiny")
    (tmp_path / "qwen2-tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("qwen2-tiny") == Path("qwen2-tiny")
    with pytest.raises(UserError, match="no checkpoint directory or known name"):
        resolve_checkpoint("no/such/dir")
    with pytest.raises(UserError, match="did you mean 'qwen2-tiny'"):
        resolve_checkpoint("qwen2-tine")


def test_shipped_files_fit_the_budget_and_carry_provenance():
    total = sum(f.stat().st_size for name in DEMO_MODELS for f in model_path(name).iterdir())
    assert total <= MAX_SHIPPED_BYTES
    assert heldout_path().stat().st_size <= 1_100_000
    source = (heldout_path().parent / "SOURCE.md").read_text(encoding="utf-8")
    assert "python3.11-doc" in source and "PSF" in source


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_models_load_through_the_reader(name):
    from dsedge.inspection import inspect_checkpoint
    from dsedge.models.checkpoint import Checkpoint

    report = Checkpoint(model_path(name)).validate()
    assert report.tensors_checked > 0 and report.has_mtp == (name == "deepseek-v3-tiny")  # its trained MTP module
    inspected = inspect_checkpoint(model_path(name))
    assert inspected.tokenizer == "tokenizer.json" and inspected.chat_template == "tokenizer_config.json"
    assert 3_000_000 < inspected.params["active"] < 3_500_000  # the twins match in active parameters


def test_deepseek_demo_is_the_v3_architecture():
    from dsedge.models.registry import load_spec

    spec = load_spec(model_path("deepseek-v3-tiny"))
    assert spec.model_type == "deepseek_v3" and spec.mla.q_lora_rank
    moe = spec.moe
    assert moe.n_routed_experts >= 8 and moe.num_experts_per_tok >= 2 and moe.n_shared_experts == 1
    assert moe.n_group >= 2 and moe.topk_group < moe.n_group and moe.first_k_dense_replace >= 1
    assert load_spec(model_path("qwen2-tiny")).model_type == "qwen2"


# ----------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def heldout_ids():
    """The shipped held-out text in the demo tokenizer (both demo models share it)."""
    return encode_text_file(model_path("deepseek-v3-tiny") / "tokenizer.json", heldout_path())


@pytest.fixture(scope="module")
def heldout_sample(heldout_ids):
    """SAMPLE_WINDOWS windows of WINDOW tokens at evenly spaced offsets: every part of the text counts."""
    starts = np.linspace(0, len(heldout_ids) - WINDOW, SAMPLE_WINDOWS).astype(int)
    return [token for start in starts for token in heldout_ids[start:start + WINDOW]]


@pytest.fixture(scope="module")
def demo_eval(heldout_sample):
    """Factory ``demo_eval(name) -> (EvalReport, {router name: selections per expert})``, cached."""
    from dsedge.models.reference import load_reference_model

    done = {}

    def run(name):
        if name not in done:
            model = load_reference_model(model_path(name))
            counts = _count_expert_selections(model)
            report = evaluate_perplexity(torch_logits_fn(model), heldout_sample, window=WINDOW, batch_size=8)
            done[name] = (report, counts)
        return done[name]

    return run


def _count_expert_selections(model) -> dict:
    counts = {}

    def hook(name):
        def record(module, inputs, output):  # output[2]: topk_indices [tokens, k]
            selected = np.bincount(output[2].flatten().numpy(), minlength=module.num_experts)
            counts[name] = counts.get(name, 0) + selected
        return record

    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(hook(name))
    return counts


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_perplexity_is_as_recorded_and_far_below_unigram(name, demo_eval, heldout_ids, heldout_sample):
    report, _ = demo_eval(name)
    assert report.tokens == SAMPLE_WINDOWS * (WINDOW - 1)
    assert report.perplexity == pytest.approx(RECORDED_SAMPLE_PERPLEXITY[name], rel=1e-3)
    # A unigram fitted on the held-out text itself is a stronger baseline than one fitted on the
    # training text (the model card's); the model still has to be ten times better.
    baseline = unigram_perplexity(heldout_ids, heldout_sample, vocab_size=4000)
    assert report.perplexity < baseline / 10
    assert report.top1_accuracy > 0.25


def test_deepseek_demo_routing_is_balanced(demo_eval):
    _, counts = demo_eval("deepseek-v3-tiny")
    assert len(counts) == 4  # layers 1-4 are MoE, layer 0 is dense
    for router, selections in counts.items():
        shares = selections / selections.sum()
        assert shares.min() > 1 / 3 / len(shares), (router, shares)  # none below a third of uniform


def test_evaluate_checkpoint_accepts_a_demo_name():
    report = evaluate_checkpoint("qwen2-tiny", max_tokens=300, window=128, batch_size=2)
    assert report.tokens == 300 - 3  # windows of 128, 128, 44: each window's first token unscored
    assert math.isclose(report.perplexity, math.exp(report.nll))
    with pytest.raises(UserError, match="did you mean 'qwen2-tiny'"):
        evaluate_checkpoint("qwen3-tiny")


# ----------------------------------------------------------------------------- evaluation helper


def _constant_logits(vocab: int):
    return lambda batch: np.zeros((len(batch), len(batch[0]), vocab), dtype=np.float32)


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    report = evaluate_perplexity(_constant_logits(37), list(range(30)) * 3, window=16, batch_size=3)
    assert report.perplexity == pytest.approx(37.0, rel=1e-12)
    assert report.nll == pytest.approx(math.log(37.0), rel=1e-12)
    assert report.tokens == 90 - math.ceil(90 / 16)


def test_top1_accuracy_counts_correct_argmax_predictions():
    vocab = 10

    def next_is_plus_one(batch):  # predicts token+1; right exactly where the sequence counts up
        logits = np.zeros((len(batch), len(batch[0]), vocab), dtype=np.float32)
        for b, window in enumerate(batch):
            for t, token in enumerate(window):
                logits[b, t, (token + 1) % vocab] = 5.0
        return logits

    ids = [0, 1, 2, 3, 7, 8, 2, 3, 4, 4]  # window 5: [0 1 2 3 7] [8 2 3 4 4]
    report = evaluate_perplexity(next_is_plus_one, ids, window=5, batch_size=2)
    assert report.tokens == 8
    assert report.top1_accuracy == pytest.approx(5 / 8)  # 0→1 1→2 2→3 | 2→3 3→4 right; 3→7 8→2 4→4 wrong
    # log-probabilities: a hit gets e^5/(e^5+9), a miss 1/(e^5+9)
    expected_nll = -(5 * math.log(math.exp(5) / (math.exp(5) + 9)) + 3 * math.log(1 / (math.exp(5) + 9))) / 8
    assert report.nll == pytest.approx(expected_nll, rel=1e-9)


def test_batching_does_not_change_the_result():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(11, 11)).astype(np.float32)  # a bigram "model"
    ids = rng.integers(0, 11, size=203).tolist()

    def bigram(batch):
        return table[np.asarray(batch)]

    one = evaluate_perplexity(bigram, ids, window=20, batch_size=1)
    many = evaluate_perplexity(bigram, ids, window=20, batch_size=7)
    assert one.tokens == many.tokens == 203 - 11
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-12)


def test_single_window_matches_transformers_loss(tiny_checkpoint):
    import torch

    from dsedge.models.reference import load_reference_model

    path = tiny_checkpoint("v3")
    model = load_reference_model(path)
    ids = list(range(3, 60))
    report = evaluate_perplexity(torch_logits_fn(model), ids, window=len(ids), batch_size=1)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert report.nll == pytest.approx(loss, rel=1e-5)


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="window"):
        evaluate_perplexity(_constant_logits(5), [1, 2, 3], window=1, batch_size=1)
    with pytest.raises(UserError, match="at least 2 tokens"):
        evaluate_perplexity(_constant_logits(5), [1], window=4, batch_size=1)
    with pytest.raises(UserError, match="outside the logits' vocabulary"):
        evaluate_perplexity(_constant_logits(5), [1, 9], window=4, batch_size=1)
    with pytest.raises(UserError, match="returned shape"):
        evaluate_perplexity(lambda batch: np.zeros((1, 1, 5)), [1, 2, 3], window=4, batch_size=1)


def test_unigram_perplexity_is_add_one_smoothed():
    # counts + 1 over vocab 4 from train [0, 0, 1]: [3, 2, 1, 1] / 7
    expected = math.exp(-(math.log(3 / 7) + math.log(1 / 7)) / 2)
    assert unigram_perplexity([0, 0, 1], [0, 3], vocab_size=4) == pytest.approx(expected)
    assert unigram_perplexity([], [2, 1], vocab_size=6) == pytest.approx(6.0)  # no data: uniform
    with pytest.raises(UserError, match="outside"):
        unigram_perplexity([0, 7], [0], vocab_size=4)


def test_demo_and_evaluation_import_without_torch():
    code = ("import sys, dsedge.demo, dsedge.evaluation\n"
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
