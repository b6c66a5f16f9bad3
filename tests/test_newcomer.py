"""A newcomer's first hour (issue 16): chat that answers on the demo models, the model's own sampling defaults,
--think/--reasoning-budget, models by name (demo, Hugging Face cache, the bundle store, published aliases),
caps said as notes, `-p -`, and a chat whose every turn failed exiting non-zero."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from dsedge.cli import main
from dsedge.demo import model_path
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.chat import ChatSession, model_sampling, prepare_prompt, reasoning_model
from dsedge.sources import hf_snapshot, published_name, resolve_checkpoint, resolve_model_name
from dsedge.store import list_bundles, resolve_bundle, store_dir, stored_path


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = {}
    for name in ("deepseek-v3-tiny", "qwen2-tiny"):
        out[name] = root / name
        export_bundle(name, out[name], validate=False)
    return out


@pytest.fixture(scope="module")
def r1_bundle(tiny_checkpoint, tmp_path_factory):
    """A tiny R1-Distill layout bundle with no reasoning record: its R1 template makes it a reasoning model."""
    out = tmp_path_factory.mktemp("r1") / "b"
    export_bundle(tiny_checkpoint("qwen2"), out, max_context=96, validate=False)
    return out


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def _cli(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- chat that answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepseek-v3-tiny", "qwen2-tiny"])
def test_demo_chat_answers_with_defaults(monkeypatch, capsys, demo_bundles, name):
    code, out, _ = _cli(monkeypatch, capsys, ["chat", str(demo_bundles[name]), "--json"],
                        "Tell me about the os module.\n")
    result = json.loads(out)
    assert code == 0 and result["ok"]
    turn = result["turns"][0]
    assert turn["answer"].strip() and turn["reasoning"] == ""  # the demo models record they do not reason
    assert not turn["prompt"].rstrip().endswith("<think>")
    assert any("generation_config" in n for n in result["notes"])  # the model's sampling, said


def test_demo_models_record_they_do_not_reason(demo_bundles):
    engine = load_bundle(demo_bundles["qwen2-tiny"])
    session = ChatSession(engine)
    assert reasoning_model(engine, session.template) is False
    # the template is R1's: on demand the think block still opens
    assert prepare_prompt(engine, [{"role": "user", "content": "hi"}], force_think="on").thinking
    assert model_sampling(engine) == {"temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1}


def test_think_modes_on_a_reasoning_template(r1_bundle):
    engine = load_bundle(r1_bundle)
    messages = [{"role": "user", "content": "hi"}]
    auto = prepare_prompt(engine, messages)
    off = prepare_prompt(engine, messages, force_think="off")
    assert auto.thinking and auto.text.endswith("<think>\n")  # no record: the R1 template decides
    assert not off.thinking and off.text.endswith("<think>\n</think>\n\n")  # closed at once: answer directly
    with pytest.raises(UserError, match="think mode"):
        prepare_prompt(engine, messages, force_think="maybe")


def test_reasoning_budget_forces_the_think_block_closed(r1_bundle):
    engine = load_bundle(r1_bundle)
    messages = [{"role": "user", "content": "hi"}]
    free = engine.chat(messages, max_new_tokens=12, temperature=0.0)
    budgeted = engine.chat(messages, max_new_tokens=12, temperature=0.0, reasoning_budget=3)
    if free.finish_reason == "length" and "</think>" not in free.text:  # the random model keeps thinking
        assert "</think>" in budgeted.text and budgeted.timings["reasoning_budget_hit"]
        assert budgeted.text.startswith(engine.codec.decode(free.token_ids[:3]))  # same first 3 tokens
        assert len(budgeted.token_ids) <= 12
    zero = engine.chat(messages, max_new_tokens=4, temperature=0.0, reasoning_budget=0)
    assert zero.reasoning == "" and zero.prompt.endswith("</think>\n\n")


def test_greedy_is_deterministic_and_flags_override(monkeypatch, capsys, demo_bundles):
    argv = ["run", str(demo_bundles["qwen2-tiny"]), "-p", "The os module", "-n", "12", "--json"]
    texts = {json.loads(_cli(monkeypatch, capsys, [*argv, "--greedy"])[1])["text"] for _ in range(2)}
    assert len(texts) == 1
    _, out, _ = _cli(monkeypatch, capsys, [*argv, "--temperature", "0", "--repetition-penalty", "1"])
    assert "notes" not in json.loads(out)  # every default overridden: nothing from the model to say
    code, out, _ = _cli(monkeypatch, capsys, [*argv, "--greedy", "--temperature", "0.7"])
    assert code == 2


# --- input and caps ------------------------------------------------------------------------------

def test_prompt_from_stdin_and_length_cap(monkeypatch, capsys, demo_bundles):
    bundle = str(demo_bundles["qwen2-tiny"])
    _, from_flag, _ = _cli(monkeypatch, capsys, ["run", bundle, "-p", "The os module", "-n", "5", "--greedy",
                                                 "--json"])
    _, from_stdin, _ = _cli(monkeypatch, capsys, ["run", bundle, "-p", "-", "-n", "5", "--greedy", "--json"],
                            "The os module\n")
    assert json.loads(from_flag)["token_ids"] == json.loads(from_stdin)["token_ids"]
    code, out, _ = _cli(monkeypatch, capsys, ["run", bundle, "-p", "hi", "-n", "1000", "--greedy", "--json"])
    result = json.loads(out)
    assert code == 0 and any("capped at" in n for n in result["notes"])
    code, _, err = _cli(monkeypatch, capsys, ["run", bundle, "-p", "hi", "-n", "2", "--greedy", "--show-sources"])
    assert code == 0 and "--show-sources has no effect" in err


def test_export_says_the_context_cap(tmp_path):
    report = export_bundle("qwen2-tiny", tmp_path / "b", max_context=4096, validate=False)
    assert report.max_context == 512 and any("capped at 512" in n for n in report.notes)


def test_chat_whose_every_turn_failed_exits_non_zero(monkeypatch, capsys, demo_bundles):
    code, out, _ = _cli(monkeypatch, capsys, ["chat", str(demo_bundles["qwen2-tiny"]), "--json", "--greedy"],
                        "spider " * 600 + "\n")
    result = json.loads(out)
    assert code == 3 and result["ok"] is False and result["error"]["failures"]


# --- models by name ------------------------------------------------------------------------------

def _fake_hf_cache(tmp_path, repo="acme/Tiny-Qwen") -> None:
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_path("qwen2-tiny"), repo_dir / "snapshots" / "abc123")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")


def test_hf_cache_repo_ids_resolve_offline(home):
    _fake_hf_cache(home)
    snapshot = home / "hub" / "models--acme--Tiny-Qwen" / "snapshots" / "abc123"
    assert resolve_checkpoint("acme/Tiny-Qwen") == snapshot == hf_snapshot("ACME/tiny-qwen")
    with pytest.raises(UserError) as error:
        resolve_checkpoint("acme/Tiny-Qwem")
    assert "did you mean 'acme/Tiny-Qwen'" in error.value.hint and "qwen2-tiny" in error.value.hint


def test_published_aliases():
    assert published_name("deepseek-r1:7b") == "r1-distill-qwen-7b"  # ollama's tag, not the 671B model
    assert published_name("deepseek-ai/DeepSeek-R1") == "deepseek-r1"
    assert published_name("nope") is None
    assert resolve_model_name("deepseek-ai/DeepSeek-V2-Lite-Chat") == "deepseek-v2-lite"


def test_plan_by_repo_id_and_tag(monkeypatch, capsys, home):
    code, out, _ = _cli(monkeypatch, capsys, ["plan", "deepseek-ai/DeepSeek-R1", "--json"])
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = _cli(monkeypatch, capsys, ["plan", "deepseek-r1:7b", "--json"])
    assert code == 0 and json.loads(out)["model_type"] == "qwen2"


def test_run_by_name_exports_once_into_the_store(monkeypatch, capsys, home):
    code, out, err = _cli(monkeypatch, capsys, ["run", "qwen2-tiny", "-p", "The os module", "-n", "3", "--greedy"])
    assert code == 0 and "exporting" in err and (store_dir() / "qwen2-tiny" / "manifest.json").is_file()
    code, _, err = _cli(monkeypatch, capsys, ["run", "qwen2-tiny", "-p", "The os module", "-n", "3", "--greedy"])
    assert code == 0 and "exporting" not in err  # the second run uses the stored bundle
    code, out, _ = _cli(monkeypatch, capsys, ["list", "--json"])
    assert code == 0 and [b["name"] for b in json.loads(out)["bundles"]] == ["qwen2-tiny"]
    code, out, _ = _cli(monkeypatch, capsys, ["rm", "qwen2-tiny"])
    assert code == 0 and list_bundles() == []
    code, _, err = _cli(monkeypatch, capsys, ["rm", "qwen2-tiny"])
    assert code == 3 and "no stored bundle" in err


def test_unknown_name_lists_what_exists(monkeypatch, capsys, home, tmp_path):
    code, out, _ = _cli(monkeypatch, capsys, ["run", "qwen2-tiyn", "-p", "hi", "--json"])
    error = json.loads(out)["error"]
    assert code == 3 and "did you mean 'qwen2-tiny'" in error["hint"] and "deepseek-v3-tiny" in error["hint"]
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):  # a directory that is not a bundle says what to do
        resolve_bundle(tmp_path / "ckpt")
    with pytest.raises(UserError, match="no bundle directory or known name"):  # a path that names nothing
        resolve_bundle(str(tmp_path / "gone" / "model.bundle"))
    with pytest.raises(UserError, match="not a model name"):  # a name never leaves the store
        stored_path("../../etc")


# --- help and rounding ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "plan", "targets", "export", "run", "chat", "profile", "index",
                                     "index build", "index add", "index query", "index stats", "serve",
                                     "completion", "list", "rm", "compress"])
def test_every_help_has_examples(capsys, command):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    assert "examples:" in capsys.readouterr().out


def test_prune_rounding_is_said(capsys):
    import argparse

    from dsedge.cli_compress import _say_prune_rounding

    args = argparse.Namespace(checkpoint="deepseek-v3-tiny", prune_experts=0.25, json=True)
    _say_prune_rounding(args)  # 12 experts in 4 groups: 3 asked → 1 per group → 4 removed
    assert args.notes == ["--prune-experts 0.25 removes 4 of 12 routed experts per layer (33%): whole experts, "
                          "the same number in each of the 4 routing groups"]
