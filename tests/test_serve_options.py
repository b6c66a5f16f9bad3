"""`dsedge serve` options and per-generation accounting: --verify (full sha256 verification before serving),
the model's generation defaults (repetition penalty included, per row of a batch), speculative counters per
generation."""

import json
import shutil
from pathlib import Path

import pytest

from dsedge import verified
from dsedge.cli import main
from dsedge.export.bundle import export_bundle
from dsedge.serve import Backend


@pytest.fixture(scope="module")
def plain_bundle(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-options")
    return Path(export_bundle(tiny_checkpoint("v2_lite"), root / "plain.bundle", max_context=256,
                              validate=False).output)


# --- --verify ------------------------------------------------------------------------------------

@pytest.fixture
def hash_calls(monkeypatch):
    calls: list[str] = []
    real = verified.sha256_file

    def counting(path):
        calls.append(Path(path).as_posix())
        return real(path)

    monkeypatch.setattr(verified, "sha256_file", counting)
    return calls


def _listed_files(bundle: Path) -> list[str]:
    return sorted(json.loads((bundle / "manifest.json").read_text())["files"])


def test_serve_verify_hashes_every_file_before_serving(plain_bundle, tmp_path, hash_calls):
    bundle = Path(shutil.copytree(plain_bundle, tmp_path / "b"))
    Backend.open(bundle)  # fast start: records what it hashed
    hash_calls.clear()
    Backend.open(bundle)
    assert len(hash_calls) < len(_listed_files(bundle))  # the record vouches: not every file hashed again
    hash_calls.clear()
    Backend.open(bundle, verify=True)
    assert len(hash_calls) == len(_listed_files(bundle))


def test_serve_verify_refuses_a_changed_file_before_it_listens(plain_bundle, tmp_path, capsys):
    bundle = Path(shutil.copytree(plain_bundle, tmp_path / "b"))
    Backend.open(bundle)
    # A file the server only reads at the first chat request: without --verify the start succeeds.
    config = bundle / "tokenizer" / "tokenizer_config.json"
    raw = bytearray(config.read_bytes())
    at = raw.rindex(b"}")  # the whitespace before the last brace changes: still JSON, another sha256
    raw[at - 1:at] = b" " if raw[at - 1:at] != b" " else b"\n"
    config.write_bytes(bytes(raw))
    Backend.open(bundle)  # fast start: nothing opened the changed file yet
    code = main(["serve", str(bundle), "--port", "0", "--verify"])
    err = capsys.readouterr().err
    assert code == main(["run", str(bundle), "-p", "x", "-n", "1", "--verify"]) != 0
    assert code in (3, 4) and "sha256" in err and "tokenizer_config.json" in err, err


# --- the model's generation defaults ---------------------------------------------------------------

PROMPTS = ["The json module", "def add(a, b):", "Honey bees live", "Steam locomotives"]
PENALTY = 2.0  # strong, so that the tiny random model's greedy replies change with it


@pytest.fixture(scope="module")
def penalized(tiny_checkpoint, tmp_path_factory):
    """A bundle whose generation_config asks for greedy decoding with a repetition penalty (the demo models
    ship repetition_penalty 1.1)."""
    from dsedge.runtime import load_bundle

    root = tmp_path_factory.mktemp("serve-penalty")
    checkpoint = Path(shutil.copytree(tiny_checkpoint("v2_lite"), root / "checkpoint"))
    config_file = checkpoint / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config.update(do_sample=False, repetition_penalty=PENALTY)
    config.pop("temperature", None)
    config.pop("top_p", None)
    config_file.write_text(json.dumps(config))
    bundle = Path(export_bundle(checkpoint, root / "penalized.bundle", max_context=256, validate=False).output)
    return bundle, load_bundle(bundle)


def _served(url, model, prompt, **extra):
    import openai

    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60.0)
    body = {"model": model, "prompt": prompt, "max_tokens": 12, **extra}
    whole = c.completions.create(**body).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **body) if ch.choices)
    assert streamed == whole
    return whole


@pytest.mark.parametrize("parallel", [1, 4])
def test_served_replies_apply_the_models_repetition_penalty(penalized, parallel):
    from concurrent.futures import ThreadPoolExecutor

    from dsedge.runtime.chat import model_sampling
    from dsedge.serve import background, create_app

    bundle, engine = penalized
    assert model_sampling(engine) == {"repetition_penalty": PENALTY}
    expected = {p: engine.generate(p, 12, **model_sampling(engine)).text for p in PROMPTS}
    plain = {p: engine.generate(p, 12).text for p in PROMPTS}
    assert expected != plain  # the penalty changes what the model says: this test can tell
    backend = Backend.open(bundle)
    with background(create_app(backend, parallel=parallel)) as url, ThreadPoolExecutor(4) as pool:
        got = dict(zip(PROMPTS, pool.map(lambda p: _served(url, backend.model_id, p, temperature=0), PROMPTS),
                       strict=True))
        overridden = _served(url, backend.model_id, PROMPTS[0], temperature=0,
                             extra_body={"repetition_penalty": 1.0})
    assert got == expected
    assert overridden == plain[PROMPTS[0]]  # the request's repetition_penalty (vLLM's extension field) wins


def test_the_defaults_follow_the_generation_config():
    from dsedge.serve import wire

    defaults = wire.Defaults(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1)
    taken = wire.parse_completion({"model": "m", "prompt": "x"}, defaults).sampling
    assert (taken.temperature, taken.top_p, taken.top_k, taken.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    given = wire.parse_completion({"model": "m", "prompt": "x", "temperature": 0, "top_k": 5,
                                   "repetition_penalty": 1.0}, defaults).sampling
    assert (given.temperature, given.top_k, given.repetition_penalty) == (0.0, 5, 1.0)
    for bad in ({"repetition_penalty": 0}, {"repetition_penalty": "1"}, {"top_k": 1.5}, {"top_k": -2}):
        with pytest.raises(wire.WireError) as error:
            wire.parse_completion({"model": "m", "prompt": "x", **bad}, defaults)
        assert error.value.status == 400 and error.value.param == next(iter(bad))


# --- speculative counters per generation ------------------------------------------------------------

SPECULATED = ["def add(a, b): return a + b\ndef add(a, b):", "The json module. The json module. The"]


def test_each_reply_reports_its_own_speculative_counters_and_metrics_sum_them(plain_bundle):
    import httpx2 as httpx

    from dsedge.runtime import load_bundle
    from dsedge.runtime.speculative import configure
    from dsedge.serve import background, create_app

    alone = load_bundle(plain_bundle)
    configure(alone, "ngram")
    expected = []
    for prompt in SPECULATED:
        alone.speculation.stats.reset()
        alone.generate(prompt, 12)
        expected.append(alone.speculation.stats.to_json())
    assert all(e["verify_steps"] > 0 for e in expected)
    backend = Backend.open(plain_bundle, speculative="ngram")
    with background(create_app(backend)) as url:
        got = []
        for prompt, stream in zip(SPECULATED, (False, True), strict=True):
            body = {"model": backend.model_id, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60.0) as response:
                    chunks = [json.loads(line[6:]) for line in response.iter_lines()
                              if line.startswith("data: {")]
                got.append(chunks[-1]["usage"]["speculative"])
            else:
                got.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60.0).json()["usage"]["speculative"])
        metrics = httpx.get(f"{url}/metrics", timeout=60.0).text
    assert got == expected  # the second reply does not carry the first one's counts
    totals = {name: sum(e[key] if key != "accepted_by_position" else sum(e[key]) for e in expected)
              for name, key in (("verify_steps", "verify_steps"), ("tokens", "tokens"),
                                ("accepted_tokens", "accepted_by_position"))}
    for name, value in totals.items():
        assert f"dsedge_serve_speculative_{name}_total {value}\n" in metrics
    drafted = sum(sum(e["drafted_by_position"]) for e in expected)
    assert f"dsedge_serve_speculative_drafted_tokens_total {drafted}\n" in metrics


def test_a_negative_prefill_chunk_is_refused(plain_bundle):
    assert main(["serve", str(plain_bundle), "--port", "0", "--parallel", "2", "--prefill-chunk", "-1"]) == 3
