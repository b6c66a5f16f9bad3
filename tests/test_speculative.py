"""Speculative decoding: greedy output identical to plain greedy on every bundle kind, the sampling
acceptance rule preserving the sampler's distribution (chi-square on a tiny vocabulary), prompt lookup."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dsedge.errors import UserError
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.decode import generate_step
from dsedge.runtime.drafts import Draft, PromptLookup
from dsedge.runtime.sampling import Sampler, SamplingParams
from dsedge.runtime.speculative import Speculation, accept_draft, configure


def _tokens(events) -> list[int]:
    return [e.token_id for e in events]


# --- a tiny numpy "model": logits from the last two tokens, read back from its cache -------------------------

class MarkovEngine:
    """Next-token logits = table[second-to-last, last]; the cache holds the tokens, so a forward after a
    wrong ``truncate`` would see the wrong context and change the distribution."""

    layout = {"tensors": ["token"], "shape": ["B", "S"], "dtype": "float32"}

    def __init__(self, vocab: int = 3, seed: int = 0, scale: float = 1.5):
        self.vocab = vocab
        self.table = np.random.default_rng(seed).normal(size=(vocab, vocab, vocab)) * scale
        self.speculation = None

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> CacheBuffers:
        return CacheBuffers(self.layout, 1, batch, max_len or 64)

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache: CacheBuffers, *, last_only: bool = False) -> np.ndarray:
        assert ids.shape[0] == 1
        seen = [int(t) for t in cache.buffers["0.token"][0, :cache.length]]
        logits = []
        for token in ids[0]:
            seen.append(int(token))
            logits.append(self.table[seen[-2] if len(seen) > 1 else 0, seen[-1]])
        cache.append({"present.0.token": ids.astype(np.float32)}, ids.shape[1])
        return np.asarray(logits)[None, -1:] if last_only else np.asarray(logits)[None]


class GreedyChainDrafter:
    """Deterministic: the table's argmax chain under a perturbed copy (right often, wrong often)."""

    name = "chain"

    def __init__(self, engine: MarkovEngine, seed: int = 5):
        self.table = engine.table + np.random.default_rng(seed).normal(size=engine.table.shape)

    def propose(self, history, k):
        seq = list(history)
        for _ in range(k):
            seq.append(int(np.argmax(self.table[seq[-2] if len(seq) > 1 else 0, seq[-1]])))
        return Draft(tuple(seq[len(history):]))


class SamplingDrafter(GreedyChainDrafter):
    """Draws drafts from its own distribution q and reports q (the general min(1, p/q) rule)."""

    name = "sampled"

    def __init__(self, engine: MarkovEngine, seed: int = 6):
        super().__init__(engine, seed)
        self.rng = np.random.default_rng(seed)

    def propose(self, history, k):
        seq, probs = list(history), []
        for _ in range(k):
            scores = self.table[seq[-2] if len(seq) > 1 else 0, seq[-1]]
            q = np.exp(scores - scores.max())
            q /= q.sum()
            probs.append(q)
            seq.append(int(self.rng.choice(q.size, p=q)))
        return Draft(tuple(seq[len(history):]), tuple(probs))


class AlwaysAccepting(Sampler):
    """A broken acceptance test (every draft stands): the negative control the chi-square must catch."""

    def uniform(self) -> float:
        return 0.0


PROMPT = [0, 2, 1]
NEW_TOKENS = 5  # V^5 = 243 outcomes; after the first token, one verify step drafts up to 3
SAMPLED = SamplingParams(temperature=0.8, top_k=2, top_p=0.9, repetition_penalty=1.3)


def _exact_distribution(engine: MarkovEngine, params: SamplingParams) -> dict[tuple, float]:
    """P(sequence) under plain (non-speculative) sampling: the product of the sampler's distributions."""
    sampler = Sampler(params)
    exact = {}
    for seq in itertools.product(range(engine.vocab), repeat=NEW_TOKENS):
        history, prob = list(PROMPT), 1.0
        for token in seq:
            logits = engine.table[history[-2], history[-1]]
            prob *= sampler.distribution(logits, history)[token]
            history.append(token)
        exact[seq] = prob
    return exact


def _chi_square_exceeds(counts: dict[tuple, int], exact: dict[tuple, float], samples: int, z: float = 4.0) -> tuple:
    """(statistic, threshold): cells expecting < 5 pooled; threshold = the chi-square quantile at z sigma
    (Wilson–Hilferty), so a correct sampler fails this fixed-seed test with probability ~3e-5."""
    big = [s for s, p in exact.items() if p * samples >= 5]
    small = [s for s, p in exact.items() if 0 < p * samples < 5]
    observed = [counts.get(s, 0) for s in big] + [sum(counts.get(s, 0) for s in small)]
    expected = [exact[s] * samples for s in big] + [sum(exact[s] for s in small) * samples]
    cells = [(o, e) for o, e in zip(observed, expected, strict=True) if e > 0]
    impossible = sum(counts.get(s, 0) for s, p in exact.items() if p == 0)
    statistic = sum((o - e) ** 2 / e for o, e in cells) + (math.inf if impossible else 0.0)
    df = len(cells) - 1
    threshold = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic, threshold


def _sample_counts(engine, speculation, sampler_class, params, samples: int, seed: int) -> dict[tuple, int]:
    engine.speculation = speculation
    counts: dict[tuple, int] = {}
    for i in range(samples):
        sampler = sampler_class(SamplingParams(**{**params.__dict__, "seed": seed * 100_003 + i}))
        seq = tuple(_tokens(generate_step(engine, PROMPT, sampler=sampler, max_new_tokens=NEW_TOKENS)))
        counts[seq] = counts.get(seq, 0) + 1
    return counts


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SAMPLED], ids=["plain", "penalty-topk-topp"])
@pytest.mark.parametrize("drafter", [GreedyChainDrafter, SamplingDrafter])
def test_speculative_sampling_keeps_the_samplers_distribution(params, drafter):
    engine = MarkovEngine()
    exact = _exact_distribution(engine, params)
    assert sum(exact.values()) == pytest.approx(1.0)
    samples = 4000
    speculation = Speculation(drafter(engine), draft_tokens=3)
    counts = _sample_counts(engine, speculation, Sampler, params, samples, seed=1)
    statistic, threshold = _chi_square_exceeds(counts, exact, samples)
    assert statistic < threshold, (statistic, threshold)
    stats = speculation.stats
    assert len(stats.drafted) == 3 and 0 < sum(stats.accepted) < sum(stats.drafted)  # both branches ran
    # the harness itself: plain sampling passes, the always-accepting rule is caught
    plain = _sample_counts(engine, None, Sampler, params, samples, seed=2)
    assert _chi_square_exceeds(plain, exact, samples)[0] < threshold
    broken = _sample_counts(engine, Speculation(drafter(engine), 3), AlwaysAccepting, params, samples, seed=3)
    assert _chi_square_exceeds(broken, exact, samples)[0] > 2 * threshold


def test_speculative_greedy_equals_greedy_on_the_numpy_model():
    engine = MarkovEngine(vocab=7, seed=3)
    prompt = [1, 2, 3, 4, 1, 2]
    plain = _tokens(generate_step(engine, prompt, max_new_tokens=30))
    for drafter, k in [(GreedyChainDrafter(engine), 1), (GreedyChainDrafter(engine), 4), (PromptLookup(), 3)]:
        engine.speculation = Speculation(drafter, k)
        assert _tokens(generate_step(engine, prompt, max_new_tokens=30)) == plain
        assert engine.speculation.stats.tokens == 29  # every token after the first came from a verify step


class WrongDrafter:
    """Always drafts a token greedy decoding will not pick: every draft is rejected."""

    name = "wrong"

    def __init__(self, engine: MarkovEngine):
        self.engine = engine

    def propose(self, history, k):
        best = int(np.argmax(self.engine.table[history[-2], history[-1]]))
        return Draft(((best + 1) % self.engine.vocab,) * k)


def test_auto_speculates_on_greedy_only_and_keeps_every_output():
    engine = MarkovEngine(vocab=7, seed=3)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    plain = _tokens(generate_step(engine, prompt, max_new_tokens=30))
    sampled = Sampler(SamplingParams(temperature=0.9, seed=11))
    plain_sampled = _tokens(generate_step(engine, prompt, sampler=sampled, max_new_tokens=30))
    auto = configure(engine, "auto")
    assert auto.mode == "auto" and auto.draft_tokens == 3
    assert _tokens(generate_step(engine, prompt, max_new_tokens=30)) == plain
    assert auto.stats.forwards > 0  # greedy went through verify steps
    auto.stats.reset()
    # sampling is left alone: the same seed gives the same tokens as with speculation off
    assert _tokens(generate_step(engine, prompt, sampler=Sampler(SamplingParams(temperature=0.9, seed=11)),
                                 max_new_tokens=30)) == plain_sampled
    assert auto.stats.forwards == 0


def test_auto_backs_off_after_rejected_drafts():
    """Drafting pauses 1, 2, 4, … 16 steps after each all-rejected step; without backoff every step drafts."""
    engine = MarkovEngine(vocab=5, seed=1)
    plain = _tokens(generate_step(engine, [0, 1], max_new_tokens=80))
    steady = Speculation(WrongDrafter(engine), 2)
    engine.speculation = steady
    assert _tokens(generate_step(engine, [0, 1], max_new_tokens=80)) == plain
    backing = Speculation(WrongDrafter(engine), 2, backoff=True)
    engine.speculation = backing
    assert _tokens(generate_step(engine, [0, 1], max_new_tokens=80)) == plain
    assert steady.stats.forwards == 79 and steady.stats.drafted[0] == 78  # all drafted but the last (no room)
    # drafting steps at 1, 3, 6, 11, 20, 37, 54, 71 (pauses 1, 2, 4, 8, 16, 16, 16): 8 of 79
    assert backing.stats.drafted[0] == 8 and backing.stats.accepted[0] == 0


def test_accept_draft_greedy_keeps_the_argmax_prefix_and_the_bonus():
    rows = np.eye(4)[[2, 3, 1, 0]] * 5  # argmax after each position: 2, 3, 1, 0
    greedy = Sampler(SamplingParams())
    assert accept_draft(Draft((2, 3, 1)), rows, greedy, [0]) == [2, 3, 1, 0]  # all accepted + bonus
    assert accept_draft(Draft((2, 0, 1)), rows, greedy, [0]) == [2, 3]  # rejected at the 2nd: the argmax
    assert accept_draft(Draft(()), rows[:1], greedy, [0]) == [2]  # nothing drafted: a plain step
    # the repetition penalty applies to the accepted drafts too, as it would have one token at a time
    close = np.array([[0.0, 1.0, 0.9], [0.0, 1.0, 0.9]])
    penalized = Sampler(SamplingParams(repetition_penalty=2.0))
    assert accept_draft(Draft((1,)), close, penalized, [0]) == [1, 2]


def test_draft_capped_by_remaining_tokens_and_cache():
    engine = MarkovEngine(vocab=5)
    engine.speculation = Speculation(GreedyChainDrafter(engine), 8)
    events = list(generate_step(engine, [0, 1], max_new_tokens=4))
    assert [e.step for e in events] == [0, 1, 2, 3]
    assert len(engine.speculation.stats.drafted) <= 2  # 3 tokens after the first: at most 2 drafted
    cache = engine.new_cache(max_len=6)  # prompt 2 + 4 new: no room for a bigger verify window
    engine.speculation.stats.reset()
    assert len(list(generate_step(engine, [0, 1], cache=cache, max_new_tokens=4))) == 4


def test_speculation_refuses_plain_function_samplers_and_bad_settings():
    engine = MarkovEngine()
    engine.speculation = Speculation(PromptLookup(), 2)
    with pytest.raises(UserError, match="Sampler"):
        list(generate_step(engine, PROMPT, sampler=lambda logits, history: 0, max_new_tokens=3))
    with pytest.raises(UserError, match="draft-tokens"):
        Speculation(PromptLookup(), 0)
    with pytest.raises(UserError, match="unknown speculative mode"):
        configure(engine, "medusa")
    assert configure(engine, "off") is None and engine.speculation is None


# --- prompt lookup ---------------------------------------------------------------------------------------------

def test_prompt_lookup_copies_after_the_longest_latest_match():
    lookup = PromptLookup(max_ngram=3)
    # suffix (7, 8, 9) occurred at the start: copy what followed it
    assert lookup.propose([7, 8, 9, 1, 2, 3, 5, 7, 8, 9], 3).tokens == (1, 2, 3)
    # the 3-gram wins over a later 1-gram match
    assert lookup.propose([4, 5, 6, 1, 9, 6, 2, 4, 5, 6], 2).tokens == (1, 9)
    # no 3- or 2-gram: the latest 1-gram
    assert lookup.propose([3, 1, 3, 2, 3], 2).tokens == (2, 3)
    # the continuation stops at the end of the history
    assert lookup.propose([5, 6, 5], 4).tokens == (6, 5)
    assert lookup.propose([1, 2, 3], 3).tokens == ()
    assert lookup.propose([1], 3).tokens == () and lookup.propose([1, 1], 0).tokens == ()
    with pytest.raises(UserError, match="n-gram"):
        PromptLookup(max_ngram=1, min_ngram=2)


# --- real bundles: every variant, both layouts, fp32 and compressed -------------------------------------------

REPEATING = [5, 9, 13, 21, 5, 9, 13, 21, 5, 9, 40, 41, 5, 9, 13]


class OracleDrafter:
    """Proposes the known greedy continuation with every third draft corrupted: long accepted runs,
    rejections at each position, and the bonus token all happen on a real model."""

    name = "oracle"

    def __init__(self, prompt, continuation, vocab):
        self.known, self.start, self.vocab, self.calls = list(prompt) + list(continuation), len(prompt), vocab, 0

    def propose(self, history, k):
        self.calls += 1
        truth = self.known[len(history): len(history) + k]
        return Draft(tuple((t + 1) % self.vocab if (self.calls + i) % 3 == 0 else t for i, t in enumerate(truth)))


def _assert_speculative_greedy_matches(engine, new_tokens=20):
    """Prompt lookup and the oracle against plain greedy, on a repeating prompt and on one that already
    holds the continuation (a RAG-like quote: prompt lookup must find drafts there)."""
    vocab = int(engine.spec["vocab_size"])
    lookup = Speculation(PromptLookup(), 3)
    configure(engine, "off")
    first = _tokens(generate_step(engine, REPEATING, max_new_tokens=new_tokens))
    for prompt in (REPEATING, REPEATING + first):
        engine.speculation = None
        plain = _tokens(generate_step(engine, prompt, max_new_tokens=new_tokens))
        oracle = Speculation(OracleDrafter(prompt, plain, vocab), 3)
        for speculation in (lookup, oracle):
            engine.speculation = speculation
            assert _tokens(generate_step(engine, prompt, max_new_tokens=new_tokens)) == plain, speculation.mode
        assert 0 < sum(oracle.stats.accepted) < sum(oracle.stats.drafted)
    assert sum(lookup.stats.drafted) > 0
    engine.speculation = None


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    from dsedge.export.bundle import export_bundle

    def build(checkpoint, layout):
        out = tmp_path_factory.mktemp("spec") / layout
        export_bundle(checkpoint, out, max_context=64, layout=layout, experts_per_partition=4, validate=False)
        return out

    return build


CASES = [("v2_lite", "monolithic"), ("v2", "monolithic"), ("v3", "monolithic"), ("qwen2", "monolithic"),
         ("llama", "monolithic"), ("v2_lite", "partitioned"), ("v2", "partitioned"), ("v3", "partitioned"),
         ("qwen2", "partitioned"), ("llama", "partitioned")]


@pytest.mark.parametrize(("variant", "layout"), CASES)
def test_speculative_greedy_equals_greedy_on_every_bundle(variant, layout, tiny_checkpoint, exported):
    from dsedge.runtime import load_bundle

    _assert_speculative_greedy_matches(load_bundle(exported(tiny_checkpoint(variant), layout)))


@pytest.mark.parametrize(("variant", "recipe", "layout"), [("v3", "int4-g32", "monolithic"),
                                                           ("v3", "int8", "partitioned"),
                                                           ("llama", "int4-g32", "monolithic")])
def test_speculative_greedy_equals_greedy_on_compressed_bundles(variant, recipe, layout, tiny_checkpoint, exported,
                                                               tmp_path_factory):
    from dsedge.compress.pipeline import compress
    from dsedge.runtime import load_bundle

    ckpt = tmp_path_factory.mktemp(f"{variant}-{recipe}") / "ckpt"
    compress(tiny_checkpoint(variant), ckpt, recipe=recipe, method="rtn", calib_tokens=64, evaluate=False)
    _assert_speculative_greedy_matches(load_bundle(exported(ckpt, layout)))


# --- flags: run, profile, serve's backend ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_bundle(tiny_checkpoint, exported):
    return exported(tiny_checkpoint("v3"), "monolithic")


def test_run_cli_speculative_gives_the_same_greedy_text(text_bundle, capsys):
    import json

    from dsedge.cli import main

    outputs = {}
    for mode in ("off", "ngram"):
        prompt = "def f(x): return x + 1\ndef g(x): return x + 1\ndef h(x):"
        assert main(["run", str(text_bundle), "-p", prompt, "-n", "12", "--greedy", "--speculative", mode,
                     "--json"]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)["token_ids"]
    assert outputs["ngram"] == outputs["off"] and len(outputs["off"]) == 12
    assert main(["run", str(text_bundle), "-p", "x", "--speculative", "ngram", "--draft-tokens", "0", "--json"]) == 3
    assert "draft-tokens" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert main(["run", str(text_bundle), "-p", "x", "--speculative", "mtp", "--json"]) == 3
    assert "MTP" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert main(["run", str(text_bundle), "-p", "x", "--speculative", "medusa"]) == 2


def test_profile_reports_acceptance_tokens_per_step_and_speedup(text_bundle, capsys):
    import json

    from dsedge.cli import main

    assert main(["profile", str(text_bundle), "--prompt-tokens", "8", "--gen-tokens", "12", "--trials", "1",
                 "--speculative", "ngram", "--draft-tokens", "2", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)["speculative"]
    assert spec["mode"] == "ngram" and spec["draft_tokens"] == 2 and spec["same_tokens"] is True
    assert spec["verify_steps"] >= 1 and 1.0 <= spec["tokens_per_verify_step"] <= 3.0
    assert len(spec["acceptance_by_position"]) <= 2 and spec["speedup"] > 0
    assert main(["profile", str(text_bundle), "--prompt-tokens", "8", "--gen-tokens", "4", "--trials", "1",
                 "--speculative", "ngram"]) == 0
    assert "tokens per verify step" in capsys.readouterr().out
    assert main(["profile", str(text_bundle), "--prompt-tokens", "8", "--gen-tokens", "4", "--trials", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["speculative"] is None


def test_serve_backend_takes_the_speculative_option(text_bundle):
    from dsedge.serve.backend import Backend

    backend = Backend.open(text_bundle, speculative="ngram", draft_tokens=2)
    assert backend.engine.speculation.mode == "ngram" and backend.engine.speculation.draft_tokens == 2
    assert Backend.open(text_bundle).engine.speculation is None


def test_speculative_prefill_computes_the_last_positions_logits_only():
    """A long prompt's logits at every position are vocab × length floats (0.6 GB for a 970-token prompt at a
    152k vocabulary): the speculative loop, like the plain one, asks the prefill for the last position only."""
    engine = MarkovEngine(vocab=7, seed=3)
    asked = []
    forward = engine.forward

    def recording(ids, mask, cache, **options):
        asked.append((ids.shape[1], options.get("last_only", False)))
        return forward(ids, mask, cache, **options)

    engine.forward = recording
    engine.speculation = Speculation(PromptLookup(), 3)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    list(generate_step(engine, prompt, max_new_tokens=8))
    assert asked[0] == (len(prompt), True)
