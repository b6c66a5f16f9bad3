"""The MTP module as the bundle's draft graph: against the independent PyTorch reference
(dsedge.testing.mtp_reference), the decoder's final hidden state against transformers, and `--speculative mtp`
drafting from them with greedy output unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_contract import assert_declared_io_matches_onnx

from dsedge.contract import FINAL_HIDDEN
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.models.checkpoint import Checkpoint
from dsedge.models.reference import reference_model
from dsedge.runtime import load_bundle
from dsedge.runtime.decode import generate_step, prefill
from dsedge.runtime.drafts import Draft, MTPDrafter
from dsedge.runtime.speculative import Speculation, configure
from dsedge.testing.mtp_reference import MTPReference

PROMPT = [5, 9, 13, 21, 5, 9, 13, 21, 5, 9, 40, 41, 5, 9, 13]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("v3", mtp=True)


@pytest.fixture(scope="module", params=["monolithic", "partitioned"])
def bundle(checkpoint, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(f"mtp-{request.param}") / "b"
    export_bundle(checkpoint, out, max_context=64, layout=request.param)  # validation of the main graph included
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    return MTPReference(checkpoint)


@pytest.fixture(scope="module")
def main_reference(checkpoint):
    return reference_model(Checkpoint(checkpoint))


def _main_hidden(main_reference, ids: list[int]) -> torch.Tensor:
    """transformers' last_hidden_state: after the final norm."""
    with torch.no_grad():
        return main_reference.model(torch.tensor([ids])).last_hidden_state


def test_export_writes_the_draft_graph(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = [g["role"] for g in manifest["graphs"]]
    assert roles[-1] == "draft" and roles.count("draft") == 1
    assert roles[0] == ("decoder" if manifest["layout"] == "monolithic" else "prelude")
    assert manifest["mtp"] == {"in_checkpoint": True, "exported": True} and not manifest["notes"]
    last_main = manifest["graphs"][0 if manifest["layout"] == "monolithic" else -2]  # the decoder, or the head
    assert FINAL_HIDDEN in [t["name"] for t in last_main["outputs"]]
    assert_declared_io_matches_onnx(bundle)


def test_draft_graph_matches_the_reference_module(bundle, reference):
    session = ort.InferenceSession(str(bundle / "graphs" / "draft.onnx"))
    width = session.get_inputs()[-1].shape[-1]
    hidden = np.random.default_rng(0).normal(size=(1, 7, reference.embed.shape[1])).astype(np.float32)
    ids = np.asarray([[3, 17, 8, 250, 8, 99, 1]])
    logits, own = (t.numpy() for t in reference(torch.tensor(ids), torch.tensor(hidden)))
    assert np.abs(logits).max() > 0.1  # not a degenerate comparison

    def run(cols: slice, past: np.ndarray) -> dict:
        n, start = cols.stop - cols.start, cols.start
        feeds = {"input_ids": ids[:, cols], "final_hidden": hidden[:, cols],
                 "position_ids": np.arange(start, start + n)[None],
                 "attention_mask": np.ones((1, past.shape[1] + n), np.int64), "past.0.latent": past}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))

    whole = run(slice(0, 7), np.zeros((1, 0, width), np.float32))
    np.testing.assert_allclose(whole["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(whole["draft_hidden"], own, atol=1e-5)
    first = run(slice(0, 4), np.zeros((1, 0, width), np.float32))  # through the module's own cache
    rest = run(slice(4, 7), first["present.0.latent"])
    np.testing.assert_allclose(np.concatenate([first["logits"], rest["logits"]], 1), logits, atol=1e-5)


def test_decoder_final_hidden_is_the_main_models_normed_last_hidden_state(bundle, main_reference):
    engine = load_bundle(bundle)
    outputs = {}
    prefill(engine, [PROMPT], outputs=outputs)
    np.testing.assert_allclose(outputs[FINAL_HIDDEN], _main_hidden(main_reference, PROMPT).numpy(), atol=1e-5)


class RecordingMTP(MTPDrafter):
    """Runs the MTP drafter (so its cache follows every step) but proposes the known greedy continuation every
    other step: accepted runs and rejections both happen. Records (history, what the MTP module proposed)."""

    def __init__(self, engine, known):
        super().__init__(engine)
        self.known, self.proposals, self.steps = known, [], 0

    def propose(self, history, k):
        mtp = super().propose(history, k)
        self.proposals.append((list(history), mtp.tokens))
        self.steps += 1
        if self.steps % 2:
            return Draft(tuple(self.known[len(history): len(history) + k]))
        return mtp


def test_mtp_drafts_follow_the_reference_through_accepts_and_rejects(bundle, reference, main_reference):
    engine = load_bundle(bundle)
    plain = [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=16)]
    recorder = RecordingMTP(engine, PROMPT + plain)
    engine.speculation = Speculation(recorder, 2)
    assert [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=16)] == plain
    stats = engine.speculation.stats
    assert 0 < sum(stats.accepted) < sum(stats.drafted)
    checked = 0
    for history, drafted in recorder.proposals:  # fresh() copies are shallow: they append to this same list
        # position L-2 of the module reads (t_{L-1}, h_{L-2}) and predicts t_L
        hidden = _main_hidden(main_reference, history[:-1])
        logits, _ = reference(torch.tensor([history[1:]]), hidden)
        assert drafted[0] == int(logits[0, -1].argmax()), history
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_speculative_mtp_greedy_equals_greedy(bundle, draft_tokens, capsys):
    from dsedge.cli import main

    engine = load_bundle(bundle)
    plain = [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=20)]
    speculation = configure(engine, "mtp", draft_tokens)
    assert speculation.draft_tokens == draft_tokens
    assert [e.token_id for e in generate_step(engine, PROMPT, max_new_tokens=20)] == plain
    assert len(speculation.stats.drafted) == draft_tokens and speculation.stats.forwards > 0
    by_mode = {}
    for mode in ("off", "mtp"):
        assert main(["run", str(bundle), "-p", "def f(x):", "-n", "8", "--greedy", "--speculative", mode,
                     "--draft-tokens", str(draft_tokens), "--json"]) == 0
        by_mode[mode] = json.loads(capsys.readouterr().out)["token_ids"]
    assert by_mode["mtp"] == by_mode["off"] and len(by_mode["off"]) == 8


def test_the_draft_session_leaves_its_threads_idle_between_runs(bundle):
    """The draft runs between two main-model forwards: its pool threads must not spin against the main
    session's run, even where the main session spins (a monolithic bundle's default)."""
    engine = load_bundle(bundle, spin=True)
    assert engine.session_config.spin is True
    options = MTPDrafter(engine).session._session._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_mtp_needs_a_draft_graph(tmp_path, tiny_checkpoint):
    for variant, layout in (("v3", "partitioned"), ("v3", "monolithic"), ("llama", "monolithic")):
        out = tmp_path / f"{variant}-{layout}"
        export_bundle(tiny_checkpoint(variant), out, max_context=32, layout=layout, validate=False)
        assert json.loads((out / "manifest.json").read_text())["mtp"]["exported"] is False
        with pytest.raises(UserError, match="no MTP draft graph"):
            configure(load_bundle(out), "mtp")
