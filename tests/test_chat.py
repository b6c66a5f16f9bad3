"""Chat templates (byte-identical to transformers), the R1 reasoning split, engine.chat and `dsedge chat`."""

import io
import json
import subprocess
import sys

import pytest

from dsedge import chat_templates
from dsedge.cli import main
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.chat import ChatSession, ChatTemplate, ReasoningSplitter, split_reasoning
from dsedge.testing.tokenizer import EOS_ID, VARIANT_CHAT_TEMPLATES, tokenizer_json, write_tokenizer

# Every fixture variant's template, plus the published ones no fixture carries.
TEMPLATES = {**VARIANT_CHAT_TEMPLATES, "deepseek-v3": chat_templates.DEEPSEEK_V3,
             "deepseek-r1": chat_templates.DEEPSEEK_R1}

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system and history with reasoning": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
        {"role": "user", "content": "How many legs does a spider have?"},
        {"role": "assistant", "content": "reasoning without an opening tag</think>Eight."},
        {"role": "user", "content": "And an ant? ünïcödé ｜ 日本"},
    ],
    "two system messages, no reasoning": [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "Thanks\n\nbye"},
    ],
    "ends with an assistant turn": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """name -> (our ChatTemplate, transformers tokenizer) over the same tokenizer files the fixtures write."""
    from transformers import AutoTokenizer

    pairs = {}
    for name, source in TEMPLATES.items():
        path = tmp_path_factory.mktemp(f"tok-{name}")
        write_tokenizer(path, chat_template=source)
        pairs[name] = (ChatTemplate.from_tokenizer_dir(path), AutoTokenizer.from_pretrained(path))
    return pairs


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_render_like_transformers(tokenizer_dirs, name):
    ours, theirs = tokenizer_dirs[name]
    assert ours.source == TEMPLATES[name]
    for messages in CONVERSATIONS.values():
        for add in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.render(messages, add_generation_prompt=add) == expected


def test_r1_templates_drop_history_reasoning_and_open_think(tokenizer_dirs):
    messages = CONVERSATIONS["system and history with reasoning"]
    r1 = tokenizer_dirs["deepseek-r1"][0].render(messages)
    assert r1.endswith("<｜Assistant｜><think>\n") and "The user greets me" not in r1 and "without an opening" not in r1
    assert r1.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜>")
    distill = tokenizer_dirs["qwen2"][0].render(messages)
    assert distill.endswith("<think>\n") and "The user greets me" not in distill
    v3 = tokenizer_dirs["deepseek-v3"][0].render(messages)  # V3 keeps assistant turns verbatim
    assert v3.endswith("<｜Assistant｜>") and "The user greets me" in v3
    v2 = tokenizer_dirs["v2"][0].render(messages)
    assert v2.endswith("User: And an ant? ünïcödé ｜ 日本\n\nAssistant:")


def test_jinja_file_wins_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, chat_template=chat_templates.DEEPSEEK_R1)
    (tmp_path / "chat_template.jinja").write_text(chat_templates.DEEPSEEK_V2, encoding="utf-8")
    messages = CONVERSATIONS["one user turn"]
    ours = ChatTemplate.from_tokenizer_dir(tmp_path)
    assert ours.origin == "chat_template.jinja"
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert ours.render(messages) == expected and expected.endswith("Assistant:")


def test_template_errors_are_user_errors():
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}", "test")
    with pytest.raises(UserError, match="roles must alternate"):
        raising.render([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="role"):
        ChatTemplate.builtin("deepseek-v3").render([{"role": "robot", "content": "x"}])
    with pytest.raises(UserError, match="unknown chat template"):
        ChatTemplate.builtin("chatml")


SPLITS = [  # (output, prompt opened <think>, reasoning, answer)
    ("Let me count.\n</think>\n\nEight.", True, "Let me count.", "Eight."),
    ("Still thinking about", True, "Still thinking about", ""),  # no </think> yet
    ("<think>\nhmm\n</think>\n\nok", False, "hmm", "ok"),  # template did not force the tag
    ("<think>\nhmm\n</think>\n\nok", True, "hmm", "ok"),  # the model repeated the forced tag
    ("Just the answer.", False, "", "Just the answer."),
    ("\n</think>\n\nDirect.", True, "", "Direct."),  # thinking skipped
    ("<think>\nunfinished", False, "unfinished", ""),
    ("a < b and </thin is not a tag", True, "a < b and </thin is not a tag", ""),
    ("x</think>y</think>z", True, "x", "y</think>z"),  # only the first close ends reasoning
    ("<thinking> is not <think>", False, "", "<thinking> is not <think>"),
    ("", True, "", ""),
]


@pytest.mark.parametrize(("text", "thinking", "reasoning", "answer"), SPLITS)
def test_split_reasoning(text, thinking, reasoning, answer):
    assert split_reasoning(text, thinking=thinking) == (reasoning, answer)


@pytest.mark.parametrize(("text", "thinking"), [(s[0], s[1]) for s in SPLITS])
def test_streamed_split_is_the_same_however_the_text_arrives(text, thinking):
    whole = split_reasoning(text, thinking=thinking)
    # two pieces cut at every point, then one character at a time
    for pieces in [*([text[:cut], text[cut:]] for cut in range(len(text) + 1)), list(text)]:
        splitter, parts = ReasoningSplitter(thinking), {"reasoning": "", "answer": ""}
        for kind, out in [pair for piece in pieces for pair in splitter.feed(piece)] + splitter.finish():
            parts[kind] += out
        assert (parts["reasoning"], parts["answer"]) == whole


# --- on a bundle ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    """A tiny R1-Distill-Qwen layout bundle: its template forces <think>\\n."""
    out = tmp_path_factory.mktemp("chat") / "b"
    export_bundle(tiny_checkpoint("qwen2"), out, max_context=96, validate=False)
    return out


@pytest.fixture(scope="module")
def engine(bundle):
    return load_bundle(bundle)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>greet</think>Hello"}, {"role": "user", "content": "Bye"}]


def test_chat_generates_the_tokens_of_the_rendered_prompt(engine, tmp_path):
    result = engine.chat(MESSAGES, max_new_tokens=10)
    write_tokenizer(tmp_path, chat_template=chat_templates.R1_DISTILL)
    assert result.prompt == ChatTemplate.from_tokenizer_dir(tmp_path).render(MESSAGES)
    assert result.prompt.endswith("<｜Assistant｜><think>\n") and "greet" not in result.prompt
    plain = engine.generate(result.prompt, max_new_tokens=10)
    assert result.token_ids == plain.token_ids and result.text == plain.text
    assert result.finish_reason == plain.finish_reason and result.prompt_tokens == plain.prompt_tokens
    assert (result.reasoning, result.answer) == split_reasoning(result.text, thinking=True)
    assert {"ttft_s", "total_s"} <= set(result.timings) and result.to_json()["answer"] == result.answer

    sampled = dict(temperature=0.9, top_k=20, seed=5)
    replies = engine.chat(MESSAGES, max_new_tokens=10, stream=True, **sampled)
    pieces = list(replies)
    assert replies.result.token_ids == engine.generate(result.prompt, max_new_tokens=10, **sampled).token_ids
    for kind in ("reasoning", "answer"):
        assert "".join(p.text for p in pieces if p.kind == kind) == getattr(replies.result, kind)


def test_r1_january_template_gets_think_forced(engine):
    # A V3/R1 bundle with R1's January template (the v3 fixture's): the runtime appends <think>\n itself.
    forced = engine.chat(MESSAGES, max_new_tokens=2, template=_template("v3"))
    assert forced.prompt == _template("v3").render(MESSAGES) + "<think>\n"
    left = engine.chat(MESSAGES, max_new_tokens=2, template=_template("v3"), force_think=False)
    assert left.prompt.endswith("<｜Assistant｜>")
    v2 = engine.chat(MESSAGES, max_new_tokens=2, template="deepseek-v2")  # a built-in family by name
    assert v2.prompt.endswith("Bye\n\nAssistant:") and v2.reasoning == "" and v2.prompt.startswith("<｜begin")


def _template(variant):
    tokens = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
    return ChatTemplate(VARIANT_CHAT_TEMPLATES[variant], variant, tokens)


def test_session_history_keeps_answers_and_fits_the_context(engine):
    session = ChatSession(engine, system="Be brief.", max_new_tokens=6)
    first = session.send("Hi")
    list(first)
    second = session.send("Again")
    list(second)
    assert session.history()[2] == {"role": "assistant", "content": first.result.answer}
    assert f"<｜Assistant｜>{first.result.answer}<｜end▁of▁sentence｜><｜User｜>Again" in second.result.prompt
    assert [t["user"] for t in session.turns] == ["Hi", "Again"]
    session.reset()
    assert session.history() == [{"role": "system", "content": "Be brief."}]
    long = session.send("spider " * 16)  # a reply capped at the context left, not refused
    assert 0 < long.max_new_tokens == engine.max_context - len(long.prompt.token_ids) < 6
    with pytest.raises(UserError, match="max context"):
        session.send("spider " * 200)


def test_chat_without_a_template_uses_the_family_builtin(engine, monkeypatch):
    from dsedge.runtime import chat as chat_module

    monkeypatch.setattr(chat_module, "_bundle_template", lambda manifest: None)
    template = chat_module.load_chat_template(engine)
    assert template.origin == "built-in r1-distill"
    assert template.special_tokens["bos_token"] == "<｜begin▁of▁sentence｜>"


# --- the CLI -------------------------------------------------------------------------------------

def run_chat(monkeypatch, capsys, bundle, lines, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", str(bundle), "-n", "5", "--greedy", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SCRIPT = ["Hello", "/reset", "Hi again", "", "Second", "/exit", "never read"]


def test_chat_cli_json_transcript(monkeypatch, capsys, bundle):
    code, out, err = run_chat(monkeypatch, capsys, bundle, SCRIPT, "--json", "--system", "Be brief.")
    assert code == 0 and err == ""
    report = json.loads(out)
    turns = report["turns"]
    assert report["ok"] and report["template"] == "tokenizer/tokenizer_config.json"
    assert [(t["conversation"], t["user"]) for t in turns] == [(0, "Hello"), (1, "Hi again"), (1, "Second")]
    assert "Hello" not in turns[1]["prompt"] and turns[1]["prompt"].startswith("<｜begin▁of▁sentence｜>Be brief.")
    assert f"Hi again<｜Assistant｜>{turns[1]['answer']}<｜end▁of▁sentence｜><｜User｜>Second" in turns[2]["prompt"]
    assert all(len(t["token_ids"]) <= 5 and t["finish_reason"] in ("eos", "stop", "length") for t in turns)


REPLY = "Let me count.\n</think>\n\nEight legs."


@pytest.fixture
def scripted_reply(monkeypatch):
    """Every generation emits REPLY then EOS through the real engine and stream (the sampler ignores logits)."""
    from tokenizers import Tokenizer

    from dsedge.runtime import generation

    ids = [*Tokenizer.from_str(tokenizer_json()).encode(REPLY, add_special_tokens=False).ids, EOS_ID]

    class Scripted:
        def __init__(self, params):
            self.step = -1

        def __call__(self, logits, history=()):
            self.step += 1
            return ids[min(self.step, len(ids) - 1)]

    monkeypatch.setattr(generation, "Sampler", Scripted)


def test_reasoning_and_answer_of_a_reply(engine, scripted_reply):
    session = ChatSession(engine, max_new_tokens=40)
    first = session.send("How many legs does a spider have?")
    pieces = list(first)
    assert (first.result.reasoning, first.result.answer, first.result.finish_reason) == (
        "Let me count.", "Eight legs.", "eos")
    assert first.result.text == REPLY and "".join(p.text for p in pieces if p.kind == "answer") == "Eight legs."
    second = session.send("And an ant?")
    list(second)
    assert "<｜Assistant｜>Eight legs.<｜end▁of▁sentence｜><｜User｜>And an ant?" in second.result.prompt
    assert "Let me count" not in second.result.prompt


def test_chat_cli_shows_reasoning_as_asked(monkeypatch, capsys, bundle, scripted_reply):
    code, out, err = run_chat(monkeypatch, capsys, bundle, ["Hello", "Second"], "-n", "40")  # EOF ends the chat
    assert code == 0 and out == "<think>\nLet me count.\n</think>\n\nEight legs.\n" * 2
    assert "dsedge chat:" in err and "/reset" in err and err.count("finish: eos") == 2

    _, out, _ = run_chat(monkeypatch, capsys, bundle, ["Hello", "Second"], "-n", "40", "--hide-reasoning", "-q")
    assert out == "Eight legs.\n" * 2

    monkeypatch.setattr("dsedge.cli_chat._is_tty", lambda stream: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, out, _ = run_chat(monkeypatch, capsys, bundle, ["Hello"], "-n", "40")
    assert out == "\033[2mLet me count.\033[0m\n\nEight legs.\n"


def test_chat_cli_reply_cut_while_thinking(monkeypatch, capsys, bundle):
    _, out, _ = run_chat(monkeypatch, capsys, bundle, ["Hello", "Second"], "--json")
    turns = json.loads(out)["turns"]
    _, out, _ = run_chat(monkeypatch, capsys, bundle, ["Hello", "Second"])
    assert out == "".join(_plain(t) for t in turns)


def _plain(turn):
    """A turn as `dsedge chat` prints it when stdout is not a terminal."""
    reasoning, answer = turn["reasoning"], turn["answer"]
    shown = f"<think>\n{reasoning}\n</think>" + ("\n\n" if answer else "") if reasoning else ""
    return shown + answer + "\n"


def test_chat_cli_errors_and_commands(monkeypatch, capsys, bundle, tmp_path):
    code, out, err = run_chat(monkeypatch, capsys, bundle, ["/help", "/nope", "spider " * 200, "/quit"])
    # the only turn failed: the chat exits with its code (3), after saying why and going on to /quit
    assert code == 3 and out == "" and "/set temperature" in err and "unknown command '/nope'" in err
    assert "max context" in err
    code, out, _ = run_chat(monkeypatch, capsys, tmp_path, ["hi"], "--json")
    assert code == 3 and json.loads(out)["ok"] is False
    code, _, err = run_chat(monkeypatch, capsys, bundle, ["hi"], "--template", "nope")
    assert code == 3 and "no chat template" in err


def test_chat_runtime_is_torch_free(bundle):
    code = ("import sys\n"
            "from dsedge.runtime import load_bundle\n"
            f"r = load_bundle({str(bundle)!r}).chat([{{'role': 'user', 'content': 'Hi'}}], max_new_tokens=3)\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print(len(r.token_ids), heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("[]")
