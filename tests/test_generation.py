"""Sampling (statistical checks on a tiny vocabulary) and text generation over a bundle."""

import json

import numpy as np
import pytest

from dsedge.cli import main
from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.sampling import Sampler, SamplingParams, filtered_probs, penalize_repetition

LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))


def draw(params, n=4000, logits=LOGITS, history=()):
    sampler = Sampler(params)
    return np.bincount([sampler(logits, history) for _ in range(n)], minlength=len(logits)) / n


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS) == 0


def test_temperature_one_follows_the_distribution():
    freq = draw(SamplingParams(temperature=1.0, seed=0))
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_top_k_never_samples_outside_the_k_best():
    freq = draw(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = filtered_probs(LOGITS.copy(), 0, 0.75)  # 0.4 + 0.3 < 0.75 ≤ 0.4 + 0.3 + 0.15
    assert np.count_nonzero(probs) == 3
    freq = draw(SamplingParams(temperature=1.0, top_p=0.75, seed=2))
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)


def test_seed_reproduces_and_differs():
    def run(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(LOGITS) for _ in range(50)]

    assert run(7) == run(7) != run(8)


def test_repetition_penalty_like_ctrl():
    scores = penalize_repetition(np.array([2.0, -1.0, 0.5]), [0, 1], 2.0)
    np.testing.assert_allclose(scores, [1.0, -2.0, 0.5])


def test_bad_sampling_parameters():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}):
        with pytest.raises(UserError):
            SamplingParams(**bad)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "b"
    export_bundle(tiny_checkpoint("v3"), out, max_context=64, validate=False)
    return out


def test_generate_finish_reasons(bundle):
    engine = load_bundle(bundle)
    greedy = engine.generate("def hello():", max_new_tokens=8)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8
    prompt_ids = engine.codec.encode("def hello():")
    assert greedy.token_ids == engine.greedy(prompt_ids, 8)  # same tokens as the export-validated path
    stop_text = greedy.text[2:4]
    stopped = engine.generate("def hello():", max_new_tokens=8, stop=[stop_text])
    assert stopped.finish_reason == "stop" and stop_text not in stopped.text and greedy.text.startswith(stopped.text)
    eos = engine.codec.eos_ids.pop()
    engine.codec.eos_ids = {greedy.token_ids[3]}  # make the 4th greedy token the end of sequence
    ended = engine.generate("def hello():", max_new_tokens=8)
    assert ended.finish_reason == "eos" and ended.token_ids == greedy.token_ids[:3]
    engine.codec.eos_ids = {eos}


def test_stream_pieces_add_up_to_the_text(bundle):
    engine = load_bundle(bundle)
    stream = engine.stream("import os", max_new_tokens=6, temperature=0.7, seed=1)
    pieces = [e.text for e in stream]
    assert "".join(pieces) == stream.result.text and len(pieces) == 6


def test_too_long_prompt_is_refused(bundle):
    with pytest.raises(UserError, match="max context"):
        load_bundle(bundle).generate(list(range(2, 60)), max_new_tokens=10)


def test_run_cli_streams_and_json(bundle, capsys):
    assert main(["run", str(bundle), "--prompt", "def f(x):", "-n", "5"]) == 0
    captured = capsys.readouterr()
    assert "finish: length" in captured.err and captured.out.strip() != ""
    assert main(["run", str(bundle), "-p", "def f(x):", "-n", "5", "--temperature", "0.8", "--seed", "3",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and len(result["token_ids"]) == 5 and result["finish_reason"] == "length"
    assert main(["run", str(bundle), "-p", "x", "--top-p", "2", "--json"]) == 3


class _ScriptedEngine:
    """Forward returns logits that make greedy pick the scripted tokens in order."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def new_cache(self, batch=1, max_len=None):
        from dsedge.runtime.cache import CacheBuffers

        return CacheBuffers({"tensors": [], "shape": ["B", "S"]}, 0, batch, max_len)  # no layers: positions only

    def forward(self, ids, mask, cache):
        logits = np.zeros((1, ids.shape[1], self.vocab), np.float32)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        cache.append({}, ids.shape[1])
        return logits


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_character_split_across_tokens_streams_whole(end):
    from tokenizers import Tokenizer

    from dsedge.runtime.generation import TextCodec, TextStream
    from dsedge.testing.tokenizer import EOS_ID, tokenizer_json

    tok = Tokenizer.from_str(tokenizer_json())
    c3, a9 = tok.token_to_id("Ã"), tok.token_to_id("©")  # byte-level symbols of 0xC3 0xA9 = "é"
    x = tok.encode("x", add_special_tokens=False).ids[0]
    script = [x, c3, a9, x, c3] + ([EOS_ID] if end == "eos" else [])
    stream = TextStream(_ScriptedEngine(script, tok.get_vocab_size()), TextCodec(tok, None, {EOS_ID}), [x],
                        max_new_tokens=len(script) if end == "eos" else 5, sampling=SamplingParams(), stop=None)
    pieces = [e.text for e in stream]
    result = stream.result
    assert "".join(pieces) == result.text and result.finish_reason == end
    assert pieces[1] == "" and pieces[2] == "é"  # held back until the character is complete
    assert result.text.startswith("xéx")
