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
    # seeded: unseeded sampling from the model's generation_config could draw EOS before 5 tokens (a flaky CI run did)
    assert main(["run", str(bundle), "--prompt", "def f(x):", "-n", "5", "--seed", "0"]) == 0
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

    def forward(self, ids, mask, cache, last_only=False):
        logits = np.zeros((1, 1 if last_only else ids.shape[1], self.vocab), np.float32)
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


# --- the decode loop (dsedge.runtime.decode) -----------------------------------------------------------

PROMPT = [5, 9, 200, 31, 7, 77, 140, 12, 3, 41]


def _recomputed(engine, prompt, n, sampler):
    """Tokens by recomputing the whole sequence every step (no cache): an oracle independent of the loop."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(sampler(engine.logits(ids)[-1], ids))
    return ids[len(prompt):]


def _tokens(events):
    return [e.token_id for e in events]


def test_generate_step_matches_full_recomputation_greedy_and_sampled(bundle):
    from dsedge.runtime.decode import generate_step

    engine = load_bundle(bundle)
    assert _tokens(generate_step(engine, PROMPT, max_new_tokens=12)) == _recomputed(
        engine, PROMPT, 12, Sampler(SamplingParams()))
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=11)
    sampled = _tokens(generate_step(engine, PROMPT, sampler=Sampler(params), max_new_tokens=12))
    assert sampled == _recomputed(engine, PROMPT, 12, Sampler(params))
    assert sampled != _tokens(generate_step(engine, PROMPT, max_new_tokens=12))  # the seed really samples


def test_generate_step_events_carry_logprobs_and_timings(bundle):
    from dsedge.evaluation import log_softmax
    from dsedge.runtime.decode import generate_step

    engine = load_bundle(bundle)
    events = list(generate_step(engine, PROMPT, max_new_tokens=4))
    full = log_softmax(engine.logits(PROMPT + [e.token_id for e in events]))
    for i, event in enumerate(events):
        assert event.step == i and event.step_s > 0
        assert event.logprobs[0] == pytest.approx(full[len(PROMPT) - 1 + i, event.token_id], abs=1e-4)
    first = events[0]
    assert 0 < first.prefill_s <= first.ttft_s == first.step_s
    assert all(e.prefill_s is None and e.ttft_s is None for e in events[1:])


def test_text_stream_is_the_generator_plus_text(bundle):
    from dsedge.runtime.decode import generate_step

    engine = load_bundle(bundle)
    params = SamplingParams(temperature=0.8, seed=4)
    stream = engine.stream(PROMPT, max_new_tokens=9, temperature=0.8, seed=4)
    assert [e.token_id for e in stream] == _tokens(generate_step(engine, PROMPT, sampler=Sampler(params),
                                                                 max_new_tokens=9))
    assert stream.result.token_ids == [e.token_id for e in engine.stream(PROMPT, 9, temperature=0.8, seed=4)]


def test_batch_of_two_left_padded_equals_each_alone(bundle):
    from dsedge.runtime.decode import generate_step

    engine = load_bundle(bundle)
    prompts = [PROMPT, PROMPT[3:7]]
    batched = [e.token_ids for e in generate_step(engine, prompts, max_new_tokens=10)]
    for row, prompt in enumerate(prompts):
        assert [t[row] for t in batched] == _tokens(generate_step(engine, prompt, max_new_tokens=10))
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=s)) for s in (1, 2)]
    sampled = [e.token_ids for e in generate_step(engine, prompts, sampler=samplers, max_new_tokens=6)]
    for row, (prompt, seed) in enumerate(zip(prompts, (1, 2), strict=True)):
        alone = generate_step(engine, prompt, sampler=Sampler(SamplingParams(temperature=1.0, seed=seed)),
                              max_new_tokens=6)
        assert [t[row] for t in sampled] == _tokens(alone)


@pytest.mark.parametrize("cached", [1, 6, len(PROMPT), len(PROMPT) + 3])
def test_starting_from_a_cached_prefix_gives_the_full_prefill_tokens(bundle, cached):
    """Only the uncached part is prefilled; a cache holding the whole prompt (or more: a longer conversation
    that shares it) is rolled back so that the last prompt token still gives the first token's logits."""
    from dsedge.runtime.decode import generate_step, prefill

    engine = load_bundle(bundle)
    full = _tokens(generate_step(engine, PROMPT, max_new_tokens=8))
    longer = PROMPT + full[:3]  # what a cache holds after an earlier turn
    state, _ = prefill(engine, [longer[:cached]], room=len(PROMPT) + 8)
    calls = []
    forward = engine.forward
    engine.forward = lambda ids, mask, cache, **kw: calls.append(ids.shape[1]) or forward(ids, mask, cache, **kw)
    assert _tokens(generate_step(engine, PROMPT, cache=state.cache, max_new_tokens=8)) == full
    assert calls[0] == len(PROMPT) - min(cached, len(PROMPT) - 1)  # the prefill ran only the uncached tokens


def test_truncate_then_forward_again_gives_the_same_logits(bundle):
    from dsedge.runtime.decode import prefill

    engine = load_bundle(bundle)
    state, _ = prefill(engine, [PROMPT[:4]], room=len(PROMPT))
    first = state.forward(np.asarray([PROMPT[4:8]]))
    state.forward(np.asarray([[1, 2, 3]]))  # a draft that is rejected
    state.truncate(8)
    again = state.forward(np.asarray([PROMPT[8:]]))
    state.truncate(4)
    np.testing.assert_array_equal(state.forward(np.asarray([PROMPT[4:8]])), first)
    np.testing.assert_allclose(again[0], engine.logits(PROMPT)[8:], atol=1e-5)


def test_a_multi_token_step_equals_one_token_steps(bundle):
    """The verify step of speculative decoding: k+1 tokens in one forward give the k+1 one-step logits."""
    from dsedge.runtime.decode import prefill

    engine = load_bundle(bundle)
    many, _ = prefill(engine, [PROMPT[:5]], room=len(PROMPT))
    together = many.forward(np.asarray([PROMPT[5:]]))[0]
    one, _ = prefill(engine, [PROMPT[:5]], room=len(PROMPT))
    steps = np.stack([one.forward(np.asarray([[t]]))[0, -1] for t in PROMPT[5:]])
    np.testing.assert_allclose(together, steps, atol=1e-5)
    assert many.length == one.length == len(PROMPT) and many.mask.shape == (1, len(PROMPT))


def test_generate_step_refuses_bad_requests(bundle):
    from dsedge.runtime.decode import generate_step, prefill

    engine = load_bundle(bundle)
    with pytest.raises(UserError, match="empty prompt"):
        next(generate_step(engine, [], max_new_tokens=2))
    with pytest.raises(UserError, match="2 samplers for 1 prompts"):
        next(generate_step(engine, PROMPT, sampler=[Sampler(SamplingParams())] * 2, max_new_tokens=2))
    state, _ = prefill(engine, [PROMPT], room=2)  # room for 2 new tokens only
    with pytest.raises(UserError, match="max context"):
        next(generate_step(engine, PROMPT, cache=state.cache, max_new_tokens=5))
    with pytest.raises(UserError, match="rows"):
        next(generate_step(engine, [PROMPT, PROMPT], cache=state.cache, max_new_tokens=1))
    assert list(generate_step(engine, PROMPT, max_new_tokens=0)) == []


# --- the cache object ---------------------------------------------------------------------------------

def test_cache_length_room_truncate_and_copy(bundle):
    from dsedge.runtime.decode import prefill

    engine = load_bundle(bundle)
    state, _ = prefill(engine, [PROMPT[:6]], room=4)
    cache = state.cache
    assert (cache.length, cache.max_len, cache.room) == (6, 10, 4) and cache.fits(4) and not cache.fits(5)
    snapshot = cache.copy()
    state.forward(np.asarray([PROMPT[6:9]]))
    assert (cache.length, snapshot.length) == (9, 6)
    for key, buf in snapshot.buffers.items():  # the copy holds the prefix and is independent of the original
        window = cache._window(0, 6)
        np.testing.assert_array_equal(buf[window], cache.buffers[key][window])
        assert not np.shares_memory(buf, cache.buffers[key])
    cache.truncate(6)
    assert cache.length == 6 and all(v.shape[cache.axis] == 6 for v in cache.past().values())
    bigger = snapshot.copy(max_len=20)
    assert (bigger.length, bigger.max_len) == (6, 20)
    for bad in (-1, 7):
        with pytest.raises(UserError, match="truncate"):
            cache.truncate(bad)
    with pytest.raises(UserError, match="cannot hold"):
        cache.copy(max_len=5)
    with pytest.raises(UserError, match="max context"):
        cache.check_room(5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_picks_the_float64_argmax_without_widening_the_logits(dtype):
    """The greedy fast path (no penalty) takes argmax of the logits as they come; first index on a tie."""
    logits = np.random.default_rng(3).standard_normal(5000).astype(dtype)
    logits[[7, 4000]] = logits.max() + 1
    assert Sampler(SamplingParams())(logits, [7, 7, 1]) == int(np.argmax(logits.astype(np.float64))) == 7
    # with a penalty the float64 path runs: the repeated tie-winner loses to the other
    assert Sampler(SamplingParams(repetition_penalty=1.3))(logits, [7]) == 4000


def test_token_logprobs_match_a_float64_log_softmax():
    from dsedge.runtime.decode import token_logprobs

    logits = (np.random.default_rng(4).standard_normal((2, 32000)) * 8).astype(np.float32)
    wide = logits.astype(np.float64)
    wide = wide - wide.max(-1, keepdims=True)
    wide -= np.log(np.exp(wide).sum(-1, keepdims=True))
    np.testing.assert_allclose(token_logprobs(logits, [5, 31999]), [wide[0, 5], wide[1, 31999]], rtol=0, atol=1e-6)
