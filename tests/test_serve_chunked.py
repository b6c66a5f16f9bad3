"""Chunked prefill through `dsedge serve --parallel`: a long prompt admitted while another client streams is
prefilled in ``prefill_chunk``-token pieces with the streaming row's decode steps between them, and every
client's reply is what it gets alone — and what it gets with chunking off."""

from concurrent.futures import ThreadPoolExecutor

import openai
from test_serve import Paced, _recording_batches, _wait_for, bundles, engines  # noqa: F401 — fixtures

from dsedge.serve import Backend, background

TIMEOUT = 60.0
STREAMING = ("The json module", 30)
LONG = ("Honey bees live in colonies with one queen and thousands of workers. " * 2, 4)
CHUNK = 16  # not the streaming prompt's length: its own prefill is not taken for a chunk


def _ask(url, model, case):
    prompt, n = case
    chunks = client(url).completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def _serve_both(bundle, prefill_chunk, monkeypatch):
    """Both replies (the streaming one first in, the long prompt joining at its token 2) and the forward
    passes' shapes in order."""
    backend = Paced(Backend.open(bundle), {2: 2})
    shapes = _recording_batches(backend.engine, monkeypatch)
    with background(backend.app(parallel=2, prefill_chunk=prefill_chunk)) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_ask, url, backend.model_id, STREAMING)
        _wait_for(lambda: backend.scheduler.active == 1)
        second = pool.submit(_ask, url, backend.model_id, LONG)
        replies = (first.result(timeout=TIMEOUT), second.result(timeout=TIMEOUT))
    return replies, shapes


def test_a_long_prompt_is_prefilled_between_the_streaming_rows_steps(bundles, engines, monkeypatch):  # noqa: F811
    engine = engines["plain"]
    long_tokens = len(engine.codec.encode(LONG[0]))
    assert 3 * CHUNK < long_tokens < 200 and len(engine.codec.encode(STREAMING[0])) != CHUNK
    expected = tuple(engine.generate(prompt, n).text for prompt, n in (STREAMING, LONG))
    assert engine.generate(*STREAMING).finish_reason == "length"  # it streams through the whole prefill

    chunked, shapes = _serve_both(bundles["plain"], CHUNK, monkeypatch)
    assert chunked == expected
    chunks = [i for i, shape in enumerate(shapes) if shape == (1, CHUNK)]
    assert len(chunks) == long_tokens // CHUNK - (long_tokens % CHUNK == 0)  # the last piece samples
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert (1, 1) in shapes[a + 1:b], shapes  # the streaming row got a token between two chunks
    assert (2, 1) in shapes[chunks[-1]:]  # then both rows decode in one forward pass

    whole, shapes = _serve_both(bundles["plain"], 0, monkeypatch)
    assert whole == chunked
    assert (1, long_tokens) in shapes and (1, CHUNK) not in shapes  # chunking off: one prefill pass
