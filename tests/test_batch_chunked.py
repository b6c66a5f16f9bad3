"""Chunked prefill in runtime.batch: a newcomer prefilled ``prefill_chunk`` tokens at a time decodes exactly as
it would alone (and as with chunking off), and the caller can step the active rows between its chunks."""

import numpy as np
import pytest
from test_batch import alone, engine  # noqa: F401 — the bundles, both layouts, fused and not

from dsedge.errors import UserError
from dsedge.runtime.batch import DecodeBatch

LONG = [int(t) for t in np.random.default_rng(7).integers(2, 200, 41)]  # 41 tokens: 5 chunks of 8 and 1
SHORT = [5, 9, 33, 120, 7]


def _recording(engine, monkeypatch) -> list[tuple[int, int]]:  # noqa: F811
    shapes, forward = [], engine.forward

    def recording(ids, mask, cache, **options):
        shapes.append(tuple(ids.shape))
        return forward(ids, mask, cache, **options)

    monkeypatch.setattr(engine, "forward", recording)
    return shapes


@pytest.mark.parametrize("chunk", [0, 1, 8, 40, 41, 100])
def test_a_chunked_prefill_decodes_as_alone(engine, chunk):  # noqa: F811
    expected, _ = alone(engine, LONG, 6)
    batch = DecodeBatch(engine, max_rows=2, prefill_chunk=chunk)
    row, event = batch.admit(LONG, max_new_tokens=6)
    tokens = [event.token_id]
    while row.remaining > 0:
        tokens += [e.token_id for r, e in batch.step() if r is row]
    assert tokens == expected


def test_the_active_rows_step_between_a_newcomers_chunks(engine, monkeypatch):  # noqa: F811
    """Events in order: the long prompt's chunks (shape [1, 8], the last one [1, 1]) alternate with decode
    steps of the active row ([1, 1] — it runs alone until the newcomer joins, then [2, 1])."""
    expected = {"short": alone(engine, SHORT, 12)[0], "long": alone(engine, LONG, 4)[0]}
    batch = DecodeBatch(engine, max_rows=2, prefill_chunk=8)
    short, event = batch.admit(SHORT, max_new_tokens=12)
    tokens = {"short": [event.token_id]}
    shapes = _recording(engine, monkeypatch)
    log = []  # ("chunk", i) and ("token", row) in the order they happened
    admission = batch.begin(LONG, max_new_tokens=4)
    assert len(batch) == 2  # the newcomer holds its row while it prefills
    with pytest.raises(UserError, match="rows already"):
        batch.begin(SHORT, max_new_tokens=1)
    while (joined := admission.advance()) is None:
        log.append(("chunk", admission.chunks))
        for _, e in batch.step():
            tokens["short"].append(e.token_id)
            log.append(("token", "short"))
    long, event = joined
    log.append(("chunk", admission.chunks))
    tokens["long"] = [event.token_id]
    while short.remaining > 0 or long.remaining > 0:
        for r, e in batch.step():
            tokens["short" if r is short else "long"].append(e.token_id)
        for r in (short, long):
            if r.remaining == 0 and not r.released:
                batch.release(r)
    assert tokens == expected
    assert log[:11] == [("chunk", 1), ("token", "short"), ("chunk", 2), ("token", "short"), ("chunk", 3),
                        ("token", "short"), ("chunk", 4), ("token", "short"), ("chunk", 5), ("token", "short"),
                        ("chunk", 6)]
    assert shapes[:11] == [(1, 8), (1, 1)] * 5 + [(1, 1)]  # 41 = 5 × 8 + 1: the last chunk samples
    assert shapes[11] == (2, 1)  # then both rows in one forward pass


def test_a_newcomer_cancelled_mid_prefill_frees_its_row(engine):  # noqa: F811
    batch = DecodeBatch(engine, max_rows=1, prefill_chunk=8)
    admission = batch.begin(LONG, max_new_tokens=4)
    assert admission.advance() is None and len(batch) == 1
    admission.cancel()
    assert len(batch) == 0
    row, event = batch.admit(SHORT, max_new_tokens=3)
    assert event.token_id == alone(engine, SHORT, 1)[0][0]


def test_a_negative_chunk_is_refused(engine):  # noqa: F811
    with pytest.raises(UserError, match="prefill chunk"):
        DecodeBatch(engine, max_rows=1, prefill_chunk=-1)


def test_each_row_keeps_its_own_repetition_penalty(engine):  # noqa: F811
    """Rows of one batch with different penalties: each decodes as it does alone with its own (the penalty
    looks at that row's history only)."""
    from dsedge.runtime.decode import generate_step
    from dsedge.runtime.sampling import Sampler, SamplingParams

    penalties = {"penalized": 2.0, "plain": 1.0}
    prompts = {"penalized": SHORT * 3, "plain": SHORT * 3}
    expected = {k: [e.token_id for e in generate_step(engine, prompts[k], max_new_tokens=10,
                                                      sampler=Sampler(SamplingParams(repetition_penalty=p)))]
                for k, p in penalties.items()}
    assert expected["penalized"] != expected["plain"]  # the penalty matters here: the test can tell
    batch = DecodeBatch(engine, max_rows=2, prefill_chunk=4)
    rows, tokens = {}, {}
    for key, penalty in penalties.items():
        rows[key], event = batch.admit(prompts[key], max_new_tokens=10,
                                       sampler=Sampler(SamplingParams(repetition_penalty=penalty)))
        tokens[key] = [event.token_id]
    while any(r.remaining > 0 for r in rows.values()):
        for r, e in batch.step():
            tokens[next(k for k, v in rows.items() if v is r)].append(e.token_id)
    assert tokens == expected
