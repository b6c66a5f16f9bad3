"""The prompt (prefix) cache: block store keyed by exact token prefixes, bytes-bounded LRU, and the conversation
cache of `dsedge chat` — the same tokens as without it, with only the new part of a prompt prefilled."""

from pathlib import Path

import numpy as np
import pytest

from dsedge.errors import UserError
from dsedge.export.bundle import export_bundle
from dsedge.runtime import load_bundle
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.chat import ChatSession, prepare_prompt
from dsedge.runtime.prefix_cache import ConversationCache, PrefixCache, common_prefix_length

LAYOUT = {"tensors": ["k", "v"], "shape": ["B", 2, "S", 3], "dtype": "float32"}
LAYERS, BLOCK = 2, 4
BLOCK_BYTES = LAYERS * 2 * (2 * BLOCK * 3) * 4  # layers × tensors × (heads × block × dim) × float32


def new_cache(batch: int = 1, max_len: int = 64) -> CacheBuffers:
    return CacheBuffers(LAYOUT, LAYERS, batch, max_len)


def run_tokens(tokens: list[int], max_len: int = 64) -> CacheBuffers:
    """A cache whose entries at each position are a function of that position's token and all before it
    (as a model's are): the running sum of the ids, so a prefix decides its entries."""
    cache = new_cache(max_len=max_len)
    running = np.cumsum(tokens).astype(np.float32)
    for value in running:
        cache.append({f"present.{i}.{t}": np.full((1, 2, 1, 3), value + i, np.float32)
                      for i in range(LAYERS) for t in ("k", "v")}, 1)
    assert cache.length == len(tokens)
    return cache


def store(capacity_blocks: float = 100) -> PrefixCache:
    return PrefixCache(new_cache, capacity_bytes=int(capacity_blocks * BLOCK_BYTES), block_size=BLOCK)


def assert_holds(cache: CacheBuffers, tokens: list[int], length: int) -> None:
    """``cache`` holds exactly the first ``length`` entries ``run_tokens(tokens)`` computes."""
    assert cache.length == length
    expected = run_tokens(tokens).past()
    for name, view in cache.past().items():
        np.testing.assert_array_equal(view, expected[name][:, :, :length])


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([7], [8]) == 0


def test_a_lookup_reuses_the_whole_blocks_of_the_longest_cached_prefix():
    cache_store = store()
    system = list(range(1, 11))  # 10 tokens: two whole blocks and a partial one
    first = [*system, 50, 51, 52, 53, 54]
    assert cache_store.insert(first, run_tokens(first)) == 3  # 15 tokens: three whole blocks
    second = [*system, 60, 61]
    cache, reused = cache_store.lookup(second, max_len=32)
    assert reused == 8 and cache.max_len == 32  # blocks 1-2 match; block 3 holds 50, 51 where 60, 61 are
    assert_holds(cache, second, 8)
    stats = cache_store.stats
    assert (stats.lookups, stats.hits, stats.reused_tokens, stats.blocks) == (1, 1, 8, 3)
    _, missed = cache_store.lookup([99, *system], max_len=32)
    assert missed == 0 and cache_store.stats.hits == 1


def test_a_fully_cached_prompt_still_runs_its_last_token():
    cache_store = store()
    prompt = list(range(1, 9))  # exactly two blocks
    cache_store.insert(prompt, run_tokens(prompt))
    cache, reused = cache_store.lookup(prompt, max_len=16)
    assert cache.length == 8 and reused == 7  # decode.prefill truncates to 7 and runs the last token


def test_shared_prefixes_are_stored_once_and_keys_are_exact():
    cache_store = store()
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9]
    cache_store.insert(a, run_tokens(a))
    assert cache_store.insert(b, run_tokens(b)) == 1 and len(cache_store) == 3  # block [1, 2, 3, 4] shared
    # The same four tokens after another first block are another block: keys are (parent, tokens).
    c = [9, 9, 9, 9, 5, 6, 7, 8]
    _, reused = cache_store.lookup([*c, 0], max_len=16)
    assert reused == 0
    cache, reused = cache_store.lookup([*b, 0], max_len=16)
    assert reused == 8
    assert_holds(cache, b, 8)


def test_only_the_positions_a_cache_holds_are_stored():
    cache_store = store()
    tokens = list(range(1, 13))
    cache = run_tokens(tokens[:9])  # e.g. a generation whose last token was never forwarded
    assert cache_store.insert(tokens, cache) == 2  # 9 held positions: two whole blocks
    cache.truncate(3)
    assert cache_store.insert(tokens, cache) == 0


def test_the_bytes_bound_holds_and_eviction_is_least_recently_used_leaf_first():
    cache_store = store(capacity_blocks=5)
    system = [1, 2, 3, 4]
    prompts = {name: [*system, *range(base, base + 8)] for name, base in (("a", 100), ("b", 200), ("c", 300))}
    cache_store.insert(prompts["a"], run_tokens(prompts["a"]))  # system + 2 blocks
    cache_store.insert(prompts["b"], run_tokens(prompts["b"]))  # + 2 blocks: 5 blocks, full
    assert cache_store.nbytes == 5 * BLOCK_BYTES
    cache_store.lookup(prompts["a"], max_len=32)  # a is now more recent than b
    cache_store.insert(prompts["c"], run_tokens(prompts["c"]))  # needs 2 blocks: b's two go, leaf first
    stats = cache_store.stats
    assert stats.bytes <= cache_store.capacity_bytes and stats.evicted_blocks == 2 and stats.blocks == 5
    assert cache_store.lookup(prompts["a"], max_len=32)[1] == 11  # a survived whole (all but its last token)
    assert cache_store.lookup(prompts["b"], max_len=32)[1] == 4  # b keeps only the shared system block
    assert cache_store.lookup(prompts["c"], max_len=32)[1] == 11
    # No block outlives its parent: every stored chain still starts at a first block.
    nodes = {block.node for block in cache_store._blocks.values()}
    assert all(block.parent == 0 or block.parent in nodes for block in cache_store._blocks.values())


def test_a_tiny_capacity_stores_what_fits_and_zero_stores_nothing():
    tokens = list(range(1, 17))
    half = store(capacity_blocks=1.5)
    assert half.insert(tokens, run_tokens(tokens)) == 1 and half.nbytes == BLOCK_BYTES
    none = store(capacity_blocks=0)
    assert none.insert(tokens, run_tokens(tokens)) == 0 and none.nbytes == 0
    too_small = store(capacity_blocks=0.5)
    assert too_small.insert(tokens, run_tokens(tokens)) == 0
    with pytest.raises(UserError, match="capacity"):
        store(capacity_blocks=-1)
    with pytest.raises(UserError, match="one-row"):
        store().insert(tokens, new_cache(batch=2))


class _Engine:
    """What ConversationCache needs of an engine."""

    max_context = 64

    def new_cache(self, batch=1, max_len=None):
        return new_cache(batch, max_len or self.max_context)


def test_the_conversation_cache_reuses_the_common_prefix_and_grows():
    conversation = ConversationCache(_Engine())
    first = [1, 2, 3, 4, 5]
    cache = conversation.take(first, max_new_tokens=4)
    assert conversation.reused == 0 and cache.length == 0 and cache.max_len == 8
    ran = [*first, 6, 7, 8]  # prompt + reply, the last reply token never forwarded
    cache = run_tokens(ran[:-1], max_len=8)
    conversation.keep(cache, ran)
    # The next prompt re-renders the reply differently from its 2nd token on: reuse stops there.
    second = [1, 2, 3, 4, 5, 6, 70, 71, 72, 73]
    again = conversation.take(second, max_new_tokens=8)
    assert conversation.reused == 6 and again.max_len >= len(second) + 7
    assert_holds(again, ran, 6)
    assert conversation.take(second, max_new_tokens=8).length == 0  # taken: an unfinished turn leaves nothing
    conversation.keep(run_tokens([1, 2, 3]), [1, 2])  # a cache that holds more than the tokens: distrusted
    assert conversation.take([1, 2, 3], max_new_tokens=1).length == 0


# --- on a real (tiny) bundle --------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    """A V2-Lite bundle (plain template) and a Qwen2 R1-Distill one (opens <think>; history drops reasoning)."""
    root = tmp_path_factory.mktemp("prefix-bundles")
    return {name: load_bundle(Path(export_bundle(tiny_checkpoint(variant), root / f"{name}.bundle",
                                                 max_context=256, validate=False).output))
            for name, variant in (("plain", "v2_lite"), ("r1", "qwen2"))}


class Forwarded:
    """Counts the tokens each forward pass of ``engine`` runs (per call: the columns of input_ids)."""

    def __init__(self, engine, monkeypatch):
        self.calls: list[int] = []
        forward = engine.forward

        def counting(ids, mask, cache, **options):
            self.calls.append(ids.shape[1])
            return forward(ids, mask, cache, **options)

        monkeypatch.setattr(engine, "forward", counting)


QUESTIONS = ["How many legs does a spider have?", "And an ant?", "Which one is faster, and why is that so?"]


@pytest.mark.parametrize("name", ["plain", "r1"])
def test_chat_turns_are_the_same_with_the_conversation_cache_and_prefill_only_the_new_part(engines, name,
                                                                                          monkeypatch):
    engine = engines[name]
    plain = ChatSession(engine, system="Be brief.", max_new_tokens=8, prompt_cache=False)
    for question in QUESTIONS:
        plain.send(question).run()
    forwarded = Forwarded(engine, monkeypatch)
    cached = ChatSession(engine, system="Be brief.", max_new_tokens=8)
    prefills, prompts = [], []
    for question in QUESTIONS:
        forwarded.calls.clear()
        stream = cached.send(question)
        stream.run()
        prefills.append(forwarded.calls[0])
        prompts.append(stream.prompt.token_ids)
    for without, with_cache in zip(plain.turns, cached.turns, strict=True):
        assert with_cache["token_ids"] == without["token_ids"] and with_cache["text"] == without["text"]
    assert cached.turns[0]["cached_tokens"] == 0 and prefills[0] == len(prompts[0])
    for turn in (1, 2):
        reused = cached.turns[turn]["cached_tokens"]
        # at least the previous prompt's shared part is reused (R1: the reasoning is not in the history)
        assert reused >= common_prefix_length(prompts[turn - 1], prompts[turn]) > 0
        assert prefills[turn] == len(prompts[turn]) - reused


def test_a_reset_conversation_still_reuses_the_system_prompt(engines):
    engine = engines["plain"]
    session = ChatSession(engine, system="You are a careful assistant who answers briefly.", max_new_tokens=4)
    session.send(QUESTIONS[0]).run()
    session.reset()
    session.send(QUESTIONS[1]).run()
    fresh = ChatSession(engine, system=session.system, max_new_tokens=4, prompt_cache=False)
    fresh.send(QUESTIONS[1]).run()
    assert session.turns[1]["cached_tokens"] > 0
    assert session.turns[1]["token_ids"] == fresh.turns[0]["token_ids"]


def test_a_prompt_sharing_a_system_prompt_prefills_only_its_new_tokens(engines, monkeypatch):
    engine = engines["plain"]
    cache_store = PrefixCache(engine.new_cache, block_size=8)
    system = {"role": "system", "content": "You answer questions about insects, briefly and precisely."}
    prompts = [prepare_prompt(engine, [system, {"role": "user", "content": q}]).token_ids for q in QUESTIONS[:2]]
    shared = common_prefix_length(*prompts)
    assert shared >= 16, shared
    expected = [engine.generate(p, 6).token_ids for p in prompts]
    forwarded = Forwarded(engine, monkeypatch)
    for prompt, tokens in zip(prompts, expected, strict=True):
        forwarded.calls.clear()
        cache, reused = cache_store.lookup(prompt, max_len=len(prompt) + 6)
        result = engine.stream(prompt, 6, cache=cache).run()
        cache_store.insert([*prompt, *result.token_ids], cache)
        assert result.token_ids == tokens
        assert forwarded.calls[0] == len(prompt) - reused
    assert reused == shared // 8 * 8 and cache_store.stats.hits == 1
