"""Stop strings through `dsedge serve`, as the real `openai` client sees them: a stop string over three
tokens never reaches a streamed client (not even its first characters), streamed deltas add up to the
non-streamed reply, and both equal the engine's own — on the one-at-a-time path, the batched path (rows of
one ``DecodeBatch``) and the chat path with reasoning split off."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from test_generation_stops import spanning_stop

from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.serve import Backend, background, create_app

TIMEOUT = 60.0
PROMPTS = ["The json module", "def add(a, b):", "Honey bees live", "Steam locomotives"]
MESSAGES = [{"role": "user", "content": "What is a queue?"}]
N = 16


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-stops")
    return {name: Path(export_bundle(tiny_checkpoint(variant), root / f"{name}.bundle", max_context=256,
                                     validate=False).output)
            for name, variant in (("plain", "v2_lite"), ("r1", "qwen2"))}


@pytest.fixture(scope="module")
def engines(bundles):
    return {name: load_bundle(path) for name, path in bundles.items()}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def _completion(url, model, prompt, stop):
    body = {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0, "stop": [stop]}
    whole = client(url).completions.create(**body).choices[0]
    chunks = list(client(url).completions.create(stream=True, **body))
    return whole.text, whole.finish_reason, ["".join(c.choices[0].text for c in chunks if c.choices)]


@pytest.mark.parametrize("parallel", [1, 4])
def test_streamed_completions_carry_nothing_of_a_stop_string(bundles, engines, parallel):
    engine = engines["plain"]
    stops = {p: spanning_stop(engine.codec, engine.generate(p, N).token_ids) for p in PROMPTS}
    assert all(stops.values()), stops
    expected = {p: engine.generate(p, N, stop=[stops[p]]) for p in PROMPTS}
    assert all(r.finish_reason == "stop" for r in expected.values())
    backend = Backend.open(bundles["plain"])
    with background(create_app(backend, parallel=parallel)) as url, ThreadPoolExecutor(4) as pool:
        got = dict(zip(PROMPTS, pool.map(lambda p: _completion(url, backend.model_id, p, stops[p]), PROMPTS),
                       strict=True))
    for prompt, (text, finish, [streamed]) in got.items():
        assert (text, finish, streamed) == (expected[prompt].text, "stop", expected[prompt].text), prompt


@pytest.mark.parametrize("name", ["plain", "r1"])
def test_streamed_chat_carries_nothing_of_a_stop_string(bundles, engines, name):
    engine = engines[name]
    stop = spanning_stop(engine.codec, engine.chat(MESSAGES, max_new_tokens=N).token_ids)
    assert stop, engine.chat(MESSAGES, max_new_tokens=N).text
    expected = engine.chat(MESSAGES, max_new_tokens=N, stop=[stop])
    assert expected.finish_reason == "stop"
    backend = Backend.open(bundles[name])
    body = {"model": backend.model_id, "messages": MESSAGES, "max_tokens": N, "temperature": 0, "stop": [stop]}
    with background(create_app(backend, parallel=2)) as url:
        message = client(url).chat.completions.create(**body).choices[0].message
        deltas = [c.choices[0].delta for c in client(url).chat.completions.create(stream=True, **body) if c.choices]
    streamed = ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                "".join(d.content or "" for d in deltas))
    assert streamed == (message.model_extra.get("reasoning_content") or "", message.content)
    assert streamed == (expected.reasoning, expected.answer)
