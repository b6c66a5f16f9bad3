"""`dsedge serve`: the OpenAI wire format as the official client sees it, errors, the API key, concurrency,
disconnects, retrieval and embeddings, metrics. Servers run in-process on 127.0.0.1 (a free port);
every client call has a timeout."""

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package ships with
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsedge.cli import main
from dsedge.export.bundle import export_bundle
from dsedge.rag import ask, open_retriever
from dsedge.retrieval import build_index
from dsedge.runtime import load_bundle
from dsedge.serve import Backend, background, create_app, wire
from dsedge.serve.metrics import Metrics
from dsedge.serve.scheduler import Job, QueueFull, Scheduler

TIMEOUT = 60.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a queue?"}]
PROMPTS = ["The json module", "def add(a, b):", "Honey bees live", "Steam locomotives", "import os",
           "class Counter:", "The sched module", "Cheese is made"]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    """A V2-Lite bundle (plain "User:/Assistant:" template) and a Qwen2 R1-Distill one (opens <think>)."""
    root = tmp_path_factory.mktemp("serve-bundles")
    return {name: Path(export_bundle(tiny_checkpoint(variant), root / f"{name}.bundle", max_context=256,
                                     validate=False).output)
            for name, variant in (("plain", "v2_lite"), ("r1", "qwen2"))}


@pytest.fixture(scope="module")
def engines(bundles):
    return {name: load_bundle(path) for name, path in bundles.items()}


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def plain(bundles):
    """A server over the plain bundle with 4 slots; yields (base url, its Backend)."""
    backend = Backend.open(bundles["plain"])
    with background(create_app(backend, parallel=4)) as url:
        yield url, backend


@pytest.fixture(scope="module")
def r1(bundles):
    backend = Backend.open(bundles["r1"])
    with background(create_app(backend)) as url:
        yield url, backend


def test_chat_equals_the_engines_greedy_reply_streamed_and_not(plain, engines):
    url, backend = plain
    expected = engines["plain"].chat(MESSAGES, max_new_tokens=12)
    reply = client(url).chat.completions.create(model=backend.model_id, messages=MESSAGES, **GREEDY)
    assert reply.choices[0].message.content == expected.answer and expected.answer
    assert reply.choices[0].finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[
        expected.finish_reason]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          len(expected.token_ids))
    chunks = list(client(url).chat.completions.create(model=backend.model_id, messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.answer
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_equals_the_engines_greedy_text_streamed_and_not(plain, engines):
    url, backend = plain
    expected = engines["plain"].generate(PROMPTS[0], 12)
    reply = client(url).completions.create(model=backend.model_id, prompt=PROMPTS[0], **GREEDY)
    assert reply.choices[0].text == expected.text and reply.usage.prompt_tokens == expected.prompt_tokens
    chunks = list(client(url).completions.create(model=backend.model_id, prompt=PROMPTS[0], stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_reply_with_finish_stop(plain, engines):
    url, backend = plain
    text = engines["plain"].generate(PROMPTS[1], 12).text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    reply = client(url).completions.create(model=backend.model_id, prompt=PROMPTS[1], stop=[stop], **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text[:text.find(stop)]


def test_r1_reasoning_goes_in_reasoning_content(r1, engines):
    url, backend = r1
    expected = engines["r1"].chat(MESSAGES, max_new_tokens=12)
    assert expected.reasoning  # the R1-Distill template opens <think>: the reply starts as reasoning
    message = client(url).chat.completions.create(model=backend.model_id, messages=MESSAGES,
                                                  **GREEDY).choices[0].message
    assert message.reasoning_content == expected.reasoning and message.content == expected.answer
    chunks = list(client(url).chat.completions.create(model=backend.model_id, messages=MESSAGES, stream=True,
                                                      **GREEDY))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == expected.reasoning
    assert "".join(d.content or "" for d in deltas) == expected.answer


def test_models_lists_the_bundle_with_its_context(plain):
    url, backend = plain
    (card,) = client(url).models.list().data
    assert card.id == backend.model_id == "plain.bundle" and card.context_length == 256


def test_health_and_metrics(plain):
    url, backend = plain
    client(url).completions.create(model=backend.model_id, prompt=PROMPTS[2], **GREEDY)
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    assert 'dsedge_serve_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert _metric(text, "dsedge_serve_generated_tokens_total") >= 12
    assert _metric(text, "dsedge_serve_ttft_seconds_count") >= 1
    assert _metric(text, "dsedge_serve_token_latency_seconds_count") >= 11
    assert _metric(text, "dsedge_serve_queue_depth") == 0
    assert "expert_cache" not in text  # monolithic bundle


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_render_prometheus_text_with_expert_cache():
    metrics = Metrics(queue_depth=lambda: 3, expert_cache=lambda: (7, 2))
    for seconds in (0.02, 0.2, 50.0):
        metrics.observe_ttft(seconds)
    metrics.count_request("/v1/completions", 429)
    text = metrics.render()
    assert 'dsedge_serve_ttft_seconds_bucket{le="0.025"} 1' in text
    assert 'dsedge_serve_ttft_seconds_bucket{le="0.25"} 2' in text
    assert 'dsedge_serve_ttft_seconds_bucket{le="+Inf"} 3' in text
    assert "dsedge_serve_expert_cache_hits_total 7" in text and "dsedge_serve_expert_cache_misses_total 2" in text
    assert "dsedge_serve_queue_depth 3" in text and 'status="429"} 1' in text
    assert all(line.startswith("#") or len(line.split()) == 2 for line in text.strip().splitlines())


BAD_REQUESTS = {
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_completion_tokens -1": ({"max_completion_tokens": -1}, "max_completion_tokens"),
    "temperature 3": ({"temperature": 3}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "top_p 1.5": ({"top_p": 1.5}, "top_p"),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    "n 2": ({"n": 2}, "n"),
    "empty messages": ({"messages": []}, "messages"),
    "stop not text": ({"stop": [1]}, "stop"),
    "five stops": ({"stop": list("abcde")}, "stop"),
    "seed text": ({"seed": "x"}, "seed"),
    "prompt past the context": ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    "retrieval without an index": ({"retrieval": {"k": 3}}, "retrieval"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_parameters_are_400_in_openais_error_shape(plain, name):
    url, backend = plain
    change, param = BAD_REQUESTS[name]
    body = {"model": backend.model_id, "messages": MESSAGES, **change}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def test_the_client_raises_the_matching_errors(plain):
    url, backend = plain
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).completions.create(model=backend.model_id, prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError, match="no embedder"):
        client(url).embeddings.create(model=backend.model_id, input="x")


def test_unknown_routes_bad_json_and_oversized_bodies(plain):
    url, _ = plain
    missing = httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/chat/completions", timeout=TIMEOUT).status_code == 405
    broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=TIMEOUT)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    big = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (5 << 20), timeout=TIMEOUT)
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(5):
            yield b" " * (1 << 20)

    streamed = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=TIMEOUT)
    assert streamed.status_code == 413


def test_the_api_key_is_required_and_checked(bundles):
    backend = Backend.open(bundles["plain"])
    with background(create_app(backend, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError, match="incorrect"):
            client(url, "wrong").models.list()
        missing = httpx.get(f"{url}/v1/models", timeout=TIMEOUT)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 401
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
        assert client(url, "s3cret").models.list().data[0].id == backend.model_id


def _single_client_answers(engine, prompts):
    return {p: engine.generate(p, 12).text for p in prompts}


def _ask(url, model, prompt, stream):
    if stream:
        chunks = client(url).completions.create(model=model, prompt=prompt, stream=True, **GREEDY)
        return "".join(c.choices[0].text for c in chunks)
    return client(url).completions.create(model=model, prompt=prompt, **GREEDY).choices[0].text


def test_four_concurrent_clients_each_get_their_single_client_answer(plain, engines):
    url, backend = plain
    expected = _single_client_answers(engines["plain"], PROMPTS[:4])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: _ask(url, backend.model_id, p, True), PROMPTS[:4]))
    assert got == [expected[p] for p in PROMPTS[:4]]


def test_a_bounded_load_loses_nothing(plain, engines):
    url, backend = plain
    expected = _single_client_answers(engines["plain"], PROMPTS)
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 2 == 0) for i in range(32)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: _ask(url, backend.model_id, *job), jobs))
    assert time.monotonic() - started < 120
    assert got == [expected[prompt] for prompt, _ in jobs]
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["active"] == 0


# --- the prompt cache ---------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a patient teacher. Answer in one short sentence, plainly."}
QUESTIONS = ["What is a queue?", "What is a stack?", "What is a heap?", "What is a tree?"]


def _counting_forwards(engine, monkeypatch) -> list[int]:
    """The tokens each forward pass of ``engine`` runs, appended as they run."""
    calls, forward = [], engine.forward

    def counting(ids, mask, cache, **options):
        calls.append(ids.shape[1])
        return forward(ids, mask, cache, **options)

    monkeypatch.setattr(engine, "forward", counting)
    return calls


def test_a_request_sharing_a_system_prompt_prefills_only_its_new_tokens(bundles, engines, monkeypatch):
    backend = Backend.open(bundles["plain"])
    forwarded = _counting_forwards(backend.engine, monkeypatch)
    with background(create_app(backend)) as url:
        replies = []
        for question in QUESTIONS[:2]:
            messages = [SYSTEM, {"role": "user", "content": question}]
            forwarded.clear()
            reply = client(url).chat.completions.create(model=backend.model_id, messages=messages, **GREEDY)
            assert reply.choices[0].message.content == engines["plain"].chat(messages, max_new_tokens=12).answer
            replies.append((reply, forwarded[0]))
        text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    (first, first_prefill), (second, second_prefill) = replies
    assert first.usage.prompt_tokens_details.cached_tokens == 0 and first_prefill == first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0  # the system prompt's whole blocks
    assert second_prefill == second.usage.prompt_tokens - cached
    assert _metric(text, "dsedge_serve_prompt_cache_hits_total") == 1
    assert _metric(text, "dsedge_serve_prompt_cache_tokens_total") == cached
    assert 0 < _metric(text, "dsedge_serve_prompt_cache_bytes") <= backend.prompt_cache.capacity_bytes


def test_a_conversation_reuses_its_earlier_turns_and_replies_as_without_the_cache(bundles, engines):
    block_bytes = sum(b.nbytes for b in engines["r1"].new_cache(max_len=16).buffers.values())
    bound = 6 * block_bytes  # six 16-token blocks: less than the conversation, so eviction runs
    backend = Backend.open(bundles["r1"], prompt_cache_bytes=bound)
    uncached = Backend.open(bundles["r1"], prompt_cache_bytes=0)
    with background(create_app(backend)) as url, background(create_app(uncached)) as plain_url:
        messages, cached = [SYSTEM], []
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            reply = client(url).chat.completions.create(model=backend.model_id, messages=messages, **GREEDY)
            without = client(plain_url).chat.completions.create(model=backend.model_id, messages=messages,
                                                                **GREEDY)
            expected = engines["r1"].chat(messages, max_new_tokens=12)
            for got in (reply, without):
                message = got.choices[0].message
                assert (message.reasoning_content or "", message.content) == (expected.reasoning, expected.answer)
            assert without.usage.prompt_tokens_details.cached_tokens == 0
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert cached[0] == 0 and all(n > 0 for n in cached[1:]), cached
    assert backend.prompt_cache.nbytes <= bound and backend.prompt_cache.stats.evicted_blocks > 0


def test_four_concurrent_clients_sharing_a_system_prompt_get_their_single_client_answers(plain, engines):
    url, backend = plain
    conversations = [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS]
    expected = [engines["plain"].chat(m, max_new_tokens=12).answer for m in conversations]
    hits = backend.prompt_cache.stats.hits

    def ask(messages):
        chunks = client(url).chat.completions.create(model=backend.model_id, messages=messages, stream=True,
                                                     **GREEDY)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, conversations)) == expected
    assert backend.prompt_cache.stats.hits >= hits + 3  # every client after the first starts from the cache


HOG = "The hog holds the slot"


class GatedBackend(Backend):
    """The real backend; a generation for the HOG prompt waits before each step after its first until
    ``release`` is set, so it holds its slot as long as a test needs."""

    def __init__(self, backend: Backend):
        super().__init__(backend.engine, backend.model_id)
        self.release, self.hog_steps = threading.Event(), 0

    def complete(self, prompt, sampling):
        generation = super().complete(prompt, sampling)
        if prompt == HOG:
            generation.steps = self._gated(generation.steps)
        return generation

    def _gated(self, steps):
        for pieces in steps:
            self.hog_steps += 1
            yield pieces
            assert self.release.wait(TIMEOUT)


def _wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_queue_is_429_and_a_disconnect_frees_the_slot(bundles, engines):
    backend = GatedBackend(Backend.open(bundles["plain"]))
    assert engines["plain"].generate(HOG, 12).finish_reason == "length"  # ungated, it would run ≥ 12 steps
    with background(create_app(backend, parallel=1, max_queue=1)) as url:
        def health():
            return httpx.get(f"{url}/health", timeout=TIMEOUT).json()

        hog_body = {"model": backend.model_id, "prompt": HOG, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", f"{url}/v1/completions",
                                                                json=hog_body) as hog:
            _wait_for(lambda: health()["active"] == 1)  # the hog holds the only slot
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(_ask, url, backend.model_id, PROMPTS[1], False)
                _wait_for(lambda: health()["queue_depth"] == 1)
                with pytest.raises(openai.RateLimitError):
                    client(url).completions.create(model=backend.model_id, prompt=PROMPTS[2], **GREEDY)
                hog.close()  # the client leaves mid-stream
                time.sleep(0.2)  # the disconnect reaches the server while the hog's step is still gated
                backend.release.set()
                assert queued.result(timeout=TIMEOUT) == engines["plain"].generate(PROMPTS[1], 12).text
        assert backend.hog_steps <= 2  # cancelled at the worker's next look, not run on to its end
        assert health() == {"status": "ok", "model": backend.model_id, "queue_depth": 0, "active": 0}
        text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
        assert 'endpoint="/v1/completions",status="429"} 1' in text


def test_the_scheduler_admits_in_order_and_interleaves_active_generations():
    import asyncio

    from dsedge.serve.backend import Generation, Piece

    order: list[str] = []

    def generation(name: str, steps: int):
        def run():
            for i in range(steps):
                order.append(name)
                yield [Piece("text", f"{name}{i}")]
        return Generation(run(), 1)

    async def drive():
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(parallel=2, max_queue=3)
        jobs = [Job(lambda n=n: generation(n, 3), loop) for n in "abc"]
        for job in jobs:
            scheduler.submit(job)
        with pytest.raises(QueueFull):
            scheduler.submit(Job(lambda: 0, loop))
        scheduler.start()
        texts = []
        for job in jobs:
            pieces = []
            while (event := await asyncio.wait_for(job.events.get(), 10)).kind != "done":
                pieces += [p.text for p in event.payload] if event.kind == "pieces" else []
            texts.append(pieces)
        scheduler.stop()
        return texts

    texts = asyncio.run(drive())
    assert texts == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]
    assert order[:6] == ["a", "b", "a", "b", "a", "b"] and order[6:] == ["c", "c", "c"]


# --- retrieval and embeddings -------------------------------------------------------------------

DOCS = {
    "bees.md": "# Bees\n\nHoney bees live in colonies with one queen and thousands of workers.\n",
    "cheese.txt": "Cheese is made by curdling milk with rennet, then pressing and ageing the curds.\n",
}
QUESTION = "How is cheese made?"


@pytest.fixture(scope="module")
def rag(bundles, embedder_dir, tmp_path_factory):
    docs = tmp_path_factory.mktemp("serve-docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    index = tmp_path_factory.mktemp("serve-index") / "docs.index"
    build_index([docs], index, chunk_tokens=48, overlap=8, embedder=embedder_dir)
    backend = Backend.open(bundles["r1"], index=index)
    with background(create_app(backend)) as url:
        engine = load_bundle(bundles["r1"])
        yield url, backend, engine, open_retriever(engine, index)


def test_retrieval_grounds_the_reply_and_returns_its_sources(rag):
    url, backend, engine, retriever = rag
    expected = ask(engine, QUESTION, retriever=retriever, k=2, max_new_tokens=8)
    body = {"model": backend.model_id, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0, "retrieval": {"k": 2}}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT).json()
    assert reply["sources"] == expected.sources and reply["sources"][0]["source"].endswith("cheese.txt")
    assert {"number", "source", "start", "end", "score"} <= set(reply["sources"][0])
    assert reply["choices"][0]["message"].get("reasoning_content", "") == expected.reasoning
    assert reply["usage"]["prompt_tokens"] == expected.prompt_tokens
    chunks = client(url).chat.completions.create(model=backend.model_id, stream=True, extra_body=body | {
        "stream": True}, messages=body["messages"])
    first = next(iter(chunks))
    assert first.model_extra["sources"] == expected.sources
    chunks.close()


def test_embeddings_come_from_the_index_embedder(rag):
    url, backend, engine, retriever = rag
    texts = ["honey bees", "curdled milk"]
    expected = retriever.index.embedder.embed(texts)
    for fmt in ({}, {"encoding_format": "float"}):  # unasked, the client gets base64 and decodes it
        reply = client(url).embeddings.create(model=backend.embedder_id, input=texts, **fmt)
        got = np.array([d.embedding for d in reply.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert reply.usage.prompt_tokens == sum(retriever.index.embedder.count_tokens(t) for t in texts)
    assert [c.id for c in client(url).models.list().data] == [backend.model_id, backend.embedder_id]
    with pytest.raises(openai.BadRequestError):
        client(url).embeddings.create(model=backend.embedder_id, input=[])


# --- the wire format on its own -----------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
FIELDS = st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
                          "stream_options", "retrieval", "prompt", "input", "encoding_format"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(FIELDS, JSON_VALUES, max_size=6))
def test_parsing_refuses_any_bad_body_with_a_400_and_nothing_else(body):
    for parse in (lambda b: wire.parse_chat(b, wire.Defaults()), lambda b: wire.parse_completion(b, wire.Defaults()),
                  wire.parse_embedding):
        try:
            parse(body)
        except wire.WireError as exc:
            assert exc.status == 400 and exc.body()["error"]["message"]


def test_streamed_events_are_sse_lines():
    assert wire.sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    assert wire.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(wire.sse(wire.usage_chunk("i", 0, "m", "x", wire.usage(2, 3)))[6:])["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}


# --- the command ---------------------------------------------------------------------------------

def test_the_command_binds_warns_and_refuses_a_taken_port(bundles, monkeypatch, caplog, capsys):
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # bind, then return at once
    with caplog.at_level(logging.WARNING, logger="dsedge"):
        assert main(["serve", str(bundles["plain"]), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert "without --api-key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsedge"):
        assert main(["serve", str(bundles["plain"]), "--port", "0", "-q"]) == 0
    assert "without --api-key" not in caplog.text
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["serve", str(bundles["plain"]), "--port", str(taken.getsockname()[1])]) == 3
    finally:
        taken.close()
    assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", str(bundles["plain"]), "--parallel", "0"]) == 3
    assert main(["serve", str(bundles["plain"]), "--prompt-cache", "lots"]) == 2


def test_the_prompt_cache_flag_reaches_the_backend(bundles, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    opened, open_backend = [], Backend.open
    monkeypatch.setattr(Backend, "open", classmethod(lambda cls, *a, **k: opened.append(k["prompt_cache_bytes"])
                                                     or open_backend(*a, **k)))
    for flag, expected in (([], 512 * 1024**2), (["--prompt-cache", "1M"], 1024**2), (["--prompt-cache", "0"], 0)):
        assert main(["serve", str(bundles["plain"]), "--port", "0", *flag]) == 0
        assert opened[-1] == expected


def test_a_missing_serve_extra_says_how_to_install_it(bundles, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn → ImportError
    assert main(["serve", str(bundles["plain"])]) == 3
    assert "pip install 'dsedge[serve]'" in capsys.readouterr().err


def test_the_worker_thread_stops_with_the_server(bundles):
    app = create_app(Backend.open(bundles["plain"]))
    scheduler = app.state.server.scheduler
    with background(app) as url:
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200 and scheduler.running
    assert not scheduler.running


# --- batched decode (--parallel N > 1) ----------------------------------------------------------

def _recording_batches(engine, monkeypatch) -> list[tuple[int, int]]:
    """The [B, T] shape of each forward pass of ``engine``, appended as they run."""
    shapes, forward = [], engine.forward

    def recording(ids, mask, cache, **options):
        shapes.append(ids.shape)
        return forward(ids, mask, cache, **options)

    monkeypatch.setattr(engine, "forward", recording)
    return shapes


class Paced(Backend):
    """The real backend; its first generation's batch row waits at token k until ``waits[k]`` requests are in
    (active or queued; the worker thread waits, so nothing else moves meanwhile): the others join its batch
    exactly there, however slowly their requests arrive."""

    def __init__(self, backend: Backend, waits: dict[int, int]):
        super().__init__(backend.engine, backend.model_id)
        self.waits, self.scheduler, self._first = waits, None, True

    def complete(self, prompt, sampling):
        return self._paced(super().complete(prompt, sampling))

    def chat(self, messages, sampling, retrieval_k=None):
        return self._paced(super().chat(messages, sampling, retrieval_k))

    def _paced(self, generation):
        if self._first:
            self._first, token, count = False, generation.row.token, iter(range(1, 1 << 30))

            def paced(event):
                depth = self.waits.get(next(count))
                if depth:
                    _wait_for(lambda: self.scheduler.queue_depth + self.scheduler.active >= depth)
                return token(event)

            generation.row.token = paced
        return generation

    def app(self, **options):
        app = create_app(self, **options)
        self.scheduler = app.state.server.scheduler
        return app


# (prompt, max_tokens): the first runs longest; the others join its batch at its tokens 2, 4 and 6, each
# shorter or longer than the batch is wide then
STAGGERED = [("The json module", 20), ("def add(a, b):\n    return a + b\n\ndef sub(a, b):", 6), ("Cheese", 14),
             ("Honey bees live in colonies with one queen and thousands of", 9)]


def test_staggered_clients_of_different_lengths_and_budgets_are_batched_and_exact(bundles, engines, monkeypatch):
    backend = Paced(Backend.open(bundles["plain"]), {2: 2, 4: 3, 6: 4})
    expected = [engines["plain"].generate(prompt, n) for prompt, n in STAGGERED]
    assert expected[0].finish_reason == "length"
    shapes = _recording_batches(backend.engine, monkeypatch)

    def ask(case):
        (prompt, n), stream = case, case[1] % 2 == 0
        body = {"model": backend.model_id, "prompt": prompt, "max_tokens": n, "temperature": 0}
        if stream:
            chunks = list(client(url).completions.create(stream=True, **body))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        choice = client(url).completions.create(**body).choices[0]
        return choice.text, choice.finish_reason

    def active():
        return httpx.get(f"{url}/health", timeout=TIMEOUT).json()["active"]

    with background(backend.app(parallel=4)) as url, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, STAGGERED[0])]
        for count, case in enumerate(STAGGERED[1:], start=2):
            _wait_for(lambda n=count - 1: active() == n)  # the ones before have joined
            futures.append(pool.submit(ask, case))
        got = [f.result(timeout=TIMEOUT) for f in futures]
        _wait_for(lambda: active() == 0)
    assert got == [(e.text, "length" if e.finish_reason == "length" else "stop") for e in expected]
    assert max(b for b, t in shapes if t == 1) == 4  # decode steps ran all four rows in one forward pass
    assert all(b == 1 for b, t in shapes if t > 1)  # prefills run alone


def test_each_batched_row_stops_at_its_own_stop_string(bundles, engines, monkeypatch):
    backend = Paced(Backend.open(bundles["plain"]), {1: 4})
    shapes = _recording_batches(backend.engine, monkeypatch)
    texts = {p: engines["plain"].generate(p, 12).text for p in PROMPTS[:4]}
    stops = {p: [t[len(t) // 2:len(t) // 2 + 2]] if i % 2 == 0 else [] for i, (p, t) in enumerate(texts.items())}
    assert all(s[0].strip() for s in stops.values() if s), texts

    def ask(prompt):
        choice = client(url).completions.create(model=backend.model_id, prompt=prompt, stop=stops[prompt] or None,
                                                **GREEDY).choices[0]
        return choice.text, choice.finish_reason

    def alone(prompt):  # what one client gets: the stream's pieces (a stop string that began in an
        stream = engine.stream(prompt, 12, stop=stops[prompt] or None)  # earlier piece is not taken back)
        return "".join(event.text for event in stream), {"stop": "stop", "eos": "stop"}.get(
            stream.result.finish_reason, "length")

    engine = engines["plain"]
    with background(backend.app(parallel=4)) as url, ThreadPoolExecutor(4) as pool:
        got = dict(zip(PROMPTS[:4], pool.map(ask, PROMPTS[:4]), strict=True))
    assert got == {prompt: alone(prompt) for prompt in PROMPTS[:4]}
    assert [finish for _, finish in got.values()] == ["stop", "length", "stop", "length"]
    assert max(b for b, t in shapes if t == 1) == 4


class SlowHog(Backend):
    """The real backend; the HOG prompt's batched row counts its tokens and takes 20 ms over each."""

    def __init__(self, backend: Backend):
        super().__init__(backend.engine, backend.model_id)
        self.hog_tokens = 0

    def complete(self, prompt, sampling):
        generation = super().complete(prompt, sampling)
        if prompt == HOG:
            token = generation.row.token

            def slow(event):
                self.hog_tokens += 1
                time.sleep(0.02)
                return token(event)

            generation.row.token = slow
        return generation


def test_a_row_cancelled_mid_batch_frees_its_slot_and_the_others_are_exact(bundles, engines):
    backend = SlowHog(Backend.open(bundles["plain"]))
    expected = _single_client_answers(engines["plain"], PROMPTS[:3])
    with background(create_app(backend, parallel=4)) as url:
        hog_body = {"model": backend.model_id, "prompt": HOG, "max_tokens": 200, "temperature": 0, "stream": True}
        with ThreadPoolExecutor(3) as pool:
            with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", f"{url}/v1/completions",
                                                                    json=hog_body) as hog:
                lines = hog.iter_lines()
                next(lines)  # the hog's first chunk: it holds a row
                others = [pool.submit(_ask, url, backend.model_id, p, True) for p in PROMPTS[:3]]
                _wait_for(lambda: httpx.get(f"{url}/health", timeout=TIMEOUT).json()["active"] == 4)
            # the hog left mid-stream, with the three others in its batch
            assert [f.result(timeout=TIMEOUT) for f in others] == [expected[p] for p in PROMPTS[:3]]
        _wait_for(lambda: httpx.get(f"{url}/health", timeout=TIMEOUT).json()["active"] == 0)
        assert backend.hog_tokens < 100  # cancelled at the worker's next look, not run on to its end
        assert client(url).completions.create(model=backend.model_id, prompt=PROMPTS[3],
                                              **GREEDY).choices[0].text == engines["plain"].generate(PROMPTS[3],
                                                                                                     12).text


def test_batched_r1_rows_split_reasoning_from_answer(bundles, engines, monkeypatch):
    backend = Paced(Backend.open(bundles["r1"]), {1: 4})  # the others join at the first one's first token
    shapes = _recording_batches(backend.engine, monkeypatch)
    conversations = [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS]
    expected = [engines["r1"].chat(m, max_new_tokens=8 + 3 * i) for i, m in enumerate(conversations)]
    with background(backend.app(parallel=4)) as url:
        def ask(i):
            chunks = client(url).chat.completions.create(model=backend.model_id, messages=conversations[i],
                                                         stream=i % 2 == 0, temperature=0, max_tokens=8 + 3 * i)
            if i % 2:
                message = chunks.choices[0].message
                return message.reasoning_content or "", message.content
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            return ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                    "".join(d.content or "" for d in deltas))

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, range(4)))
    assert got == [(e.reasoning, e.answer) for e in expected]
    assert any(e.reasoning for e in expected)
    assert max(b for b, t in shapes if t == 1) == 4  # all four rows in one forward pass


@pytest.fixture(scope="module")
def partitioned_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-partitioned") / "parts.bundle"
    export_bundle(tiny_checkpoint("v2_lite"), out, max_context=256, layout="partitioned", experts_per_partition=4,
                  validate=False)
    return out


def test_a_partitioned_bundle_batches_four_clients_exactly(partitioned_bundle, engines, monkeypatch):
    backend = Paced(Backend.open(partitioned_bundle), {1: 4})
    assert backend.engine.layout == "partitioned"
    shapes = _recording_batches(backend.engine, monkeypatch)
    expected = _single_client_answers(engines["plain"], PROMPTS[:4])  # the same checkpoint, monolithic
    with background(backend.app(parallel=4)) as url, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: _ask(url, backend.model_id, p, True), PROMPTS[:4]))
    assert got == [expected[p] for p in PROMPTS[:4]]
    assert max(b for b, t in shapes if t == 1) == 4  # all four rows in one forward pass
