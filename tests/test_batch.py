"""runtime.batch: rows joining and leaving one batch decode exactly as they would alone (both layouts).

Every row gets a recording greedy sampler: the logits it was handed at each step are compared with those of
the same prompt decoded alone through ``decode.generate_step`` (fp32 tolerance), and its tokens must be equal.
"""

from pathlib import Path

import numpy as np
import pytest

from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.batch import DecodeBatch
from dsedge.runtime.decode import generate_step
from dsedge.runtime.generation import TokenText
from dsedge.runtime.prefix_cache import PrefixCache
from dsedge.runtime.sampling import Sampler, SamplingParams

PROMPTS = [[5, 9, 33, 120, 7], [11, 2, 64, 18, 3, 90, 41, 8, 77, 12, 30, 6, 54, 99, 23, 17, 45, 61, 28],
           [44], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]]


@pytest.fixture(scope="module", params=[("v2_lite", "monolithic"), ("qwen2", "monolithic"),
                                        ("v2_lite", "partitioned"), ("qwen2-gqa", "monolithic")],
                ids=lambda p: "-".join(p))
def engine(request, tiny_checkpoint, tmp_path_factory):
    variant, layout = request.param
    tmp = tmp_path_factory.mktemp("batch")
    out = tmp / f"{variant}-{layout}.bundle"
    extra = {"experts_per_partition": 4} if layout == "partitioned" else {}
    if variant == "qwen2-gqa":  # head_dim 16: the fused GroupQueryAttention path, whose cache is updated in place
        from test_fused_attention import _with_head_dim

        checkpoint = _with_head_dim(tmp, "qwen2", 16)
    else:
        checkpoint = tiny_checkpoint(variant)
    export_bundle(checkpoint, out, max_context=96, layout=layout, validate=False, **extra)
    engine = load_bundle(Path(out))
    assert (variant == "qwen2-gqa") == engine.new_cache().in_place
    return engine


class Recording:
    """Greedy, remembering the logits of every call."""

    def __init__(self):
        self.greedy, self.seen = Sampler(SamplingParams()), []

    def __call__(self, logits, history):
        self.seen.append(np.array(logits, np.float32))
        return self.greedy(logits, history)


def alone(engine, prompt, n):
    """Tokens and per-step logits of ``prompt`` decoded on its own."""
    sampler = Recording()
    tokens = [e.token_id for e in generate_step(engine, prompt, sampler=sampler, max_new_tokens=n)]
    return tokens, sampler.seen


def drive(batch, schedule, budgets):
    """Run ``batch``: ``schedule`` maps a step number to the prompts admitted before it (and "cancel" to
    rows released there). Returns each row's tokens and the logits its sampler saw."""
    rows, samplers, tokens, step = {}, {}, {}, 0
    while step in schedule or any(not r.released for r in rows.values()):
        for key in schedule.get(step, []):
            if isinstance(key, tuple):  # ("cancel", key)
                batch.release(rows[key[1]])
                continue
            samplers[key] = Recording()
            rows[key], event = batch.admit(PROMPTS[key], max_new_tokens=budgets[key], sampler=samplers[key])
            tokens[key] = [event.token_id]
        for row, event in batch.step():
            key = next(k for k, r in rows.items() if r is row)
            tokens[key].append(event.token_id)
            assert event.step == len(tokens[key]) - 1
        for row in rows.values():
            if row.remaining == 0:
                batch.release(row)
        step += 1
        assert step < 200
    return tokens, {k: s.seen for k, s in samplers.items()}


def test_rows_joining_at_different_times_decode_as_alone(engine):
    budgets = {0: 14, 1: 6, 2: 10, 3: 9}
    # row 1 (19 tokens) joins a batch 8 columns wide: the batch widens; row 2 (1 token) joins a wide one
    schedule = {0: [0], 3: [1], 4: [2], 9: [3]}
    batch = DecodeBatch(engine, max_rows=4)
    tokens, seen = drive(batch, schedule, budgets)
    for key, budget in budgets.items():
        expected, logits = alone(engine, PROMPTS[key], budget)
        assert tokens[key] == expected, key
        assert len(seen[key]) == budget
        np.testing.assert_allclose(np.stack(seen[key]), np.stack(logits), rtol=1e-4, atol=1e-4)
    assert len(batch) == 0 and batch.length == 0  # empty: the cache is dropped


def test_a_row_cancelled_mid_batch_leaves_the_others_unchanged(engine):
    budgets = {0: 12, 1: 12, 2: 12}
    batch = DecodeBatch(engine, max_rows=3)
    tokens, _ = drive(batch, {0: [0, 1, 2], 4: [("cancel", 1)]}, budgets)
    assert len(tokens[1]) == 5  # its first token, then 4 batch steps
    for key in (0, 2):
        assert tokens[key] == alone(engine, PROMPTS[key], 12)[0]
    assert tokens[1] == alone(engine, PROMPTS[1], 5)[0]


def test_the_batch_only_runs_active_rows_and_never_a_spent_rows_last_token(engine, monkeypatch):
    shapes, forward = [], engine.forward

    def recording(ids, mask, cache, **options):
        shapes.append(ids.shape)
        assert mask.shape == (ids.shape[0], cache.length + ids.shape[1])
        return forward(ids, mask, cache, **options)

    monkeypatch.setattr(engine, "forward", recording)
    batch = DecodeBatch(engine, max_rows=2)
    a, _ = batch.admit(PROMPTS[0], max_new_tokens=3)
    b, _ = batch.admit(PROMPTS[2], max_new_tokens=1)  # spent at its first token: never joins
    shapes.clear()
    batch.step()
    batch.step()
    assert shapes == [(1, 1), (1, 1)] and a.remaining == 0
    assert batch.rebuilds == 1  # when a joined; a step with the same rows copies nothing
    assert batch.step() == [] and shapes == [(1, 1), (1, 1)]  # a's last token is not forwarded
    with pytest.raises(UserError):
        for _ in range(3):
            batch.admit(PROMPTS[0], max_new_tokens=2)


def test_padding_columns_weigh_exactly_zero(engine):
    """Junk in the padded columns of the batch cache changes nothing: the graphs mask padded keys."""
    batch = DecodeBatch(engine, max_rows=2)
    batch.admit(PROMPTS[1], max_new_tokens=4)
    batch.admit(PROMPTS[2], max_new_tokens=4)
    batch.step()  # both joined: row 2 is padded on 18 columns
    state = batch._state
    mask = state.mask.copy()
    clean = state.forward(np.asarray([[r.history[-1]] for r in batch.rows]))
    state.cache.truncate(mask.shape[1])  # roll the step back
    state.mask = mask
    noise = np.random.default_rng(0)
    axis = state.cache.axis
    for buf in state.cache.buffers.values():
        pad = np.flatnonzero(mask[1] == 0)
        window = [slice(None)] * buf.ndim
        window[0], window[axis] = 1, pad
        buf[tuple(window)] = noise.normal(0, 1e3, buf[tuple(window)].shape)
    junk = state.forward(np.asarray([[r.history[-1]] for r in batch.rows]))
    np.testing.assert_array_equal(junk, clean)


def test_a_row_from_a_prompt_cache_prefix_and_its_copy_out(engine):
    store = PrefixCache(engine.new_cache, block_size=4)
    prompt = PROMPTS[1]
    batch = DecodeBatch(engine, max_rows=3)
    first, _ = batch.admit(prompt, max_new_tokens=5)
    store.insert(prompt, first.cache)
    batch.admit(PROMPTS[0], max_new_tokens=8)
    for _ in range(4):
        batch.step()
    held = batch.row_cache(first)  # prompt + 4 forwarded tokens, copied out of the batch
    assert held.batch == 1 and held.length == len(prompt) + 4
    cache = engine.new_cache(batch=1, max_len=len(prompt) + 5)
    assert store.fill(cache, first.history) == 16
    second, event = batch.admit(first.history, max_new_tokens=1, cache=cache)
    expected, _ = alone(engine, first.history, 1)
    assert event.token_id == expected[0]
    single = engine.new_cache(batch=1, max_len=len(prompt) + 4)
    engine.forward(np.asarray([first.history[:len(prompt) + 4]]), np.ones((1, len(prompt) + 4), np.int64), single)
    for name, view in held.past().items():
        np.testing.assert_allclose(view, single.past()[name], rtol=1e-4, atol=1e-5)


def test_token_text_is_what_a_text_stream_runs(engine):
    """The per-token text logic pushed from a batch gives the stream's own result."""
    codec = engine.codec
    if codec is None:
        pytest.skip("no tokenizer")
    expected = engine.generate("The json module", 8)
    batch = DecodeBatch(engine, max_rows=1)
    row, event = batch.admit(codec.encode("The json module"), max_new_tokens=8)
    text = TokenText(codec, None, 8)
    text.push(event)
    while not text.done:
        (_, event), = batch.step()
        text.push(event)
    result = text.result(row.prompt_tokens)
    assert (result.text, result.token_ids, result.finish_reason) == (expected.text, expected.token_ids,
                                                                     expected.finish_reason)
