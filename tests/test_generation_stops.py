"""Stop strings in streams: text that may begin a stop string is held back until it can no longer match
(released then) or the stream ends (flushed), so the streamed pieces always add up to the final text and no
piece ever carries any part of a stop string — for the plain stream, the chat splitter over it, and the rows
of a batched decode (which push the same ``TokenText``)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsedge.runtime.chat import ChatText, _stream_pieces, split_reasoning
from dsedge.runtime.generation import SamplingParams, TextStream

EOS = 0
PIECES = {1: "ab", 2: "c", 3: "<s", 4: "to", 5: "p>", 6: "xyz", 7: "<", 8: " ", 9: "</think>", 10: "st", 11: "op>"}


class _PieceCodec:
    """A codec whose tokens decode to fixed pieces (so tests can place stop strings across tokens)."""

    eos_ids = {EOS}

    def decode(self, ids):
        return "".join(PIECES[i] for i in ids)


class _ScriptedEngine:
    """Forward returns logits that make greedy pick the scripted tokens in order."""

    def __init__(self, script: list[int]):
        self.script, self.calls = list(script), 0

    def new_cache(self, batch=1, max_len=None):
        from dsedge.runtime.cache import CacheBuffers

        return CacheBuffers({"tensors": [], "shape": ["B", "S"]}, 0, batch, max_len)

    def forward(self, ids, mask, cache, last_only=False):
        logits = np.zeros((1, 1 if last_only else ids.shape[1], len(PIECES) + 1), np.float32)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        cache.append({}, ids.shape[1])
        return logits


def _stream(script, stop, max_new=None):
    return TextStream(_ScriptedEngine(script), _PieceCodec(), [1], max_new_tokens=max_new or len(script),
                      sampling=SamplingParams(), stop=stop)


def _pieces(script, stop, max_new=None):
    stream = _stream(script, stop, max_new)
    return [e.text for e in stream], stream.result


def _oracle(script, stop, max_new):
    """(text, finish reason) without any streaming: the first token whose text holds a stop string ends it,
    cut where the earliest stop string present starts."""
    for k in range(1, min(len(script), max_new) + 1):
        if script[k - 1] == EOS:
            return _PieceCodec().decode(script[:k - 1]), "eos"
        text = _PieceCodec().decode(script[:k])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)], "stop"
    return _PieceCodec().decode(script[:max_new]), "length"


def test_a_stop_string_over_three_tokens_is_never_streamed():
    pieces, result = _pieces([1, 2, 3, 4, 5, 6], ["<stop>"])
    assert result.text == "abc" and result.finish_reason == "stop"
    assert "".join(pieces) == "abc"
    assert pieces == ["ab", "c", "", "", ""]  # "<s", "<sto" held back; "<stop>" completes: nothing of it out


def test_a_stop_string_over_two_tokens_starting_mid_token():
    pieces, result = _pieces([1, 6, 10, 11, 2], ["zstop>"])  # "xyz" + "st" + "op>": it starts inside "xyz"
    assert result.text == "abxy" and "".join(pieces) == "abxy"
    assert pieces == ["ab", "xy", "", ""]


def test_a_held_back_prefix_is_released_once_the_text_diverges():
    pieces, result = _pieces([1, 3, 4, 2, 6], ["<stop>"], max_new=5)
    assert result.text == "ab<stocxyz" and result.finish_reason == "length"
    assert pieces == ["ab", "", "", "<stoc", "xyz"]


def test_the_earliest_of_several_stop_strings_wins_and_each_one_holds_back():
    pieces, result = _pieces([1, 7, 2, 6, 8], ["<stop>", "cx", "z "])
    assert result.text == "ab<" and result.finish_reason == "stop"  # "cx" completes at "xyz"
    assert pieces == ["ab", "", "<", ""]  # "<" held (it may begin "<stop>"), then "c" (it may begin "cx")


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_held_back_tail_is_flushed_when_the_stream_ends(end):
    script = [1, 3, 4] + ([EOS] if end == "eos" else [])
    pieces, result = _pieces(script, ["<stop>"])
    assert result.text == "ab<sto" and result.finish_reason == end
    assert pieces == (["ab", "", "<sto"] if end == "length" else ["ab", "", "", "<sto"])  # the last step flushes


@settings(max_examples=150, deadline=None)
@given(script=st.lists(st.sampled_from(sorted(PIECES) + [EOS]), min_size=1, max_size=10),
       stop=st.lists(st.sampled_from(["<stop>", "c<", "z<s", "b", "p>x", "yz ", "</think>x", "o"]), max_size=3),
       max_new=st.integers(1, 10))
def test_streamed_pieces_add_up_to_the_final_text_and_the_final_text_is_right(script, stop, max_new):
    script = (script * max_new)[:max_new]
    pieces, result = _pieces(script, stop, max_new)
    assert "".join(pieces) == result.text
    assert (result.text, result.finish_reason) == _oracle(script, stop, max_new)


@settings(max_examples=100, deadline=None)
@given(script=st.lists(st.sampled_from(sorted(PIECES)), min_size=1, max_size=10),
       stop=st.lists(st.sampled_from(["<stop>", "c<", "k>a", "b", "p>x", "</th"]), max_size=3),
       thinking=st.booleans())
def test_the_reasoning_split_with_stop_strings_streams_the_final_split(script, stop, thinking):
    stream = _stream(script, stop)
    reply = ChatText(thinking)
    pieces = [*_stream_pieces(stream, reply), *reply.finish("")]
    joined = {"reasoning": "", "answer": ""}
    for piece in pieces:
        joined[piece.kind] += piece.text
    assert (joined["reasoning"], joined["answer"]) == split_reasoning(stream.result.text, thinking=thinking)
    assert stream.result.text == _oracle(script, stop, len(script))[0]


def test_a_stop_string_across_the_think_close_never_reaches_the_answer():
    stream = _stream([3, 9, 6, 3, 10, 11, 2], ["<sstop>"])  # "<s</think>xyz<sstop>c"
    reply = ChatText(True)
    pieces = [*_stream_pieces(stream, reply), *reply.finish("")]
    assert [(p.kind, p.text) for p in pieces] == [("reasoning", "<s"), ("answer", "xyz")]
    assert stream.result.finish_reason == "stop"


# --- a real bundle: the CLI's stream -------------------------------------------------------------

def spanning_stop(codec, token_ids: list[int]) -> str | None:
    """A stop string over three tokens of a generation (else over two) — from the last character of one
    token's text to the first of the token after next (after) — that first occurs there; None when the text
    has none."""
    ends = [len(codec.decode(token_ids[:k])) for k in range(len(token_ids) + 1)]
    text = codec.decode(token_ids)
    for span in (2, 1):
        for i in range(1, len(token_ids) - span):
            if ends[i] - ends[i - 1] < 1 or any(ends[j + 1] == ends[j] for j in range(i, i + span + 1)):
                continue
            start, stop = ends[i] - 1, ends[i + span - 1] + 1
            candidate = text[start:stop]
            if "\ufffd" not in candidate and text.find(candidate) == start:
                return candidate
    return None


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    from dsedge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("stops") / "b"
    export_bundle(tiny_checkpoint("v3"), out, max_context=64, validate=False)
    return out


def test_dsedge_run_streams_nothing_of_a_stop_string_over_three_tokens(bundle, capsys):
    import json

    from dsedge.cli import main
    from dsedge.runtime import load_bundle

    args = ["run", str(bundle), "-p", "def hello():", "-n", "16", "--greedy"]
    assert main([*args, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    stop = spanning_stop(load_bundle(bundle).codec, full["token_ids"])
    assert stop is not None, full["text"]
    assert main([*args, "--stop", stop, "--json"]) == 0
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full["text"][:full["text"].find(stop)]
    assert main([*args, "--stop", stop]) == 0
    streamed = capsys.readouterr().out
    assert streamed in (stopped["text"], stopped["text"] + "\n")  # what the terminal got: not a character more
