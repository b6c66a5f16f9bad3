"""The generation engine over a bundle (onnxruntime + numpy; never torch)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from dsedge.contract import ATTENTION_MASK, INPUT_IDS, LOGITS_FROM, POSITION_IDS
from dsedge.errors import UserError
from dsedge.manifest import TAMPERED, BundleError, GraphEntry, Manifest
from dsedge.runtime.bundle import DeclaredSession, verified_graph_path
from dsedge.runtime.cache import CacheBuffers
from dsedge.runtime.chat import chat
from dsedge.runtime.decode import generate_step
from dsedge.runtime.generation import EncodingRule, SamplingParams, TextCodec, TextStream, encoding_rule_of
from dsedge.runtime.session import ORT_ERRORS, GraphTimers, SessionConfig, TimedSession, make_session


def positions_from_mask(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last ``new_tokens`` columns: count of real tokens before each (pads → 0)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new_tokens:].astype(np.int64)


class Engine(ABC):
    """Generation over a bundle; subclasses say how one forward pass runs (one graph, or trunk + experts)."""

    layout = "abstract"
    traces_layers = False  # whether a forward pass can record each layer's output (``trace``; validation)

    def __init__(self, manifest: Manifest, session_config: SessionConfig):
        self.manifest = manifest
        self.session_config = session_config
        contract = manifest.contract
        self.spec = contract.model
        self.cache_layout = contract.cache.to_json()
        self.max_context = contract.max_context
        self.timers = GraphTimers()

    def graph(self, role: str, **match) -> list[GraphEntry]:
        """The manifest's graphs of ``role`` (dsedge.contract.ROLES) whose fields equal ``match``."""
        return self.manifest.contract.graphs_in(role, **match)

    def session(self, graph: GraphEntry, model: bytes | None = None,
                config: SessionConfig | None = None) -> DeclaredSession:
        """A timed session of ``graph``, run by its declared inputs and outputs (``run_with``). ``model``: the
        serialized graph itself (a composed one, built from verified graphs), its external data resolved from
        the bundle root."""
        source = verified_graph_path(self.manifest, graph) if model is None else model
        root = None if model is None else self.manifest.root  # a serialized graph's external data folder
        try:
            session = make_session(source, config or self.session_config, data_root=root, stem=graph.name)
        except ORT_ERRORS as exc:  # a graph that passed the checks but that onnxruntime cannot load
            raise BundleError(f"onnxruntime cannot load graph {graph.name} ({graph.file}): {str(exc)[:300]}",
                              where=str(root or source),
                              hint=f"{TAMPERED}; if the bundle is as export wrote it, please report this with its "
                                   "manifest.json") from None
        if not hasattr(self, "_providers"):
            self._providers = list(session.get_providers())
        return DeclaredSession(TimedSession(session, graph.name, self.timers), graph)

    @property
    def providers(self) -> list[str]:
        """Execution providers the sessions actually got (after any fallback), in priority order."""
        return getattr(self, "_providers", [])

    @abstractmethod
    def run_graph(self, feeds: dict[str, np.ndarray], cache: CacheBuffers) -> dict[str, np.ndarray]:
        """Outputs ``logits`` and ``present.*`` for inputs ids/positions/mask, reading ``cache``."""

    @property
    def layers(self) -> int:
        return int(self.spec["num_hidden_layers"])

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> CacheBuffers:
        """Buffers for ``max_len`` positions (≤ the bundle's max context, which sizes its RoPE tables)."""
        if max_len is not None and max_len > self.max_context:
            raise UserError(f"{max_len} tokens (prompt + new) exceed the bundle's max context of {self.max_context}",
                            where="kv cache",
                            hint="shorten the prompt or max_new_tokens, or re-export with a larger --max-context")
        return CacheBuffers(self.cache_layout, self.layers, batch, max_len or self.max_context)

    def forward(self, input_ids: np.ndarray, mask: np.ndarray, cache: CacheBuffers, *,
                last_only: bool = False, outputs: dict | None = None) -> np.ndarray:
        """Run new tokens [B, T] (mask covers cache + new) and append their cache entries; logits [B, T, V]
        (``last_only``: [B, 1, V], the last position's, and the head runs for it alone). ``outputs``: a dict to
        receive every graph output too (e.g. ``final_hidden`` for the MTP draft)."""
        new_tokens = input_ids.shape[1]
        cache.check_room(new_tokens)
        if cache.in_place and cache.length and new_tokens > 1 and input_ids.shape[0] > 1:
            # GroupQueryAttention takes several new tokens after a cache only at batch 1: one at a time here
            cached = mask.shape[1] - new_tokens
            steps = [self.forward(input_ids[:, j:j + 1], mask[:, :cached + j + 1], cache)
                     for j in range(new_tokens)]
            return steps[-1] if last_only else np.concatenate(steps, axis=1)
        first = new_tokens - 1 if last_only else 0
        feeds = {INPUT_IDS: input_ids.astype(np.int64), ATTENTION_MASK: mask.astype(np.int64),
                 POSITION_IDS: positions_from_mask(mask, new_tokens), LOGITS_FROM: np.array([first], np.int64)}
        result = self.run_graph(feeds, cache)
        cache.append(result, new_tokens)
        if outputs is not None:
            outputs.update(result)
        logits = result["logits"]
        return logits[:, first - new_tokens:] if logits.shape[1] == new_tokens else logits  # bundles before it

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [T, vocab] of a whole sequence in one prefill pass."""
        self._check_tokens(token_ids)
        ids = np.asarray([token_ids], dtype=np.int64)
        return self.forward(ids, np.ones_like(ids), self.new_cache(max_len=len(token_ids)))[0]

    def greedy(self, token_ids: list[int], n: int) -> list[int]:
        """n greedy tokens: prefill, then one token at a time through the cache."""
        return self.greedy_batch([token_ids], n)[0]

    def greedy_batch(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """Greedy continuations of several prompts at once (left padding)."""
        for p in prompts:
            self._check_tokens(p)
        steps = [event.token_ids for event in generate_step(self, prompts, max_new_tokens=n)]
        return [[tokens[row] for tokens in steps] for row in range(len(prompts))]

    # --- text generation ------------------------------------------------------------------------
    @property
    def codec(self):
        """The bundle's tokenizer, loaded on first use (None when the bundle has none)."""
        if not hasattr(self, "_codec"):
            self._codec = _load_codec(self.manifest)
        return self._codec

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None, cache=None):
        """A TextStream: iterate it for StreamEvents (token id + new text) as tokens are produced; its ``result``
        (a GenerationResult) is set when iteration ends. Greedy when temperature is 0. ``cache``: one holding a
        prefix of the prompt (a prompt cache's; see ``decode.prefill``)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        return TextStream(self, self.codec, prompt, max_new_tokens=max_new_tokens, sampling=params, stop=stop,
                          cache=cache)

    def generate(self, prompt, max_new_tokens: int = 128, **sampling):
        """Generate to completion; returns a GenerationResult (text, token ids, finish reason, timings)."""
        return self.stream(prompt, max_new_tokens, **sampling).run()

    def chat(self, messages: list[dict], max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, stream: bool = False, **options):
        """Reply to chat messages through the bundle's chat template: a ChatResult (text, reasoning, answer,
        token ids, finish reason, timings), or with ``stream=True`` a ChatStream of reasoning/answer pieces.
        See dsedge.runtime.chat.chat (``template``, ``force_think``)."""
        return chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed, stop=stop, stream=stream, **options)

    def _check_tokens(self, token_ids: list[int]) -> None:
        vocab = int(self.spec["vocab_size"])
        if not token_ids:
            raise UserError("empty prompt", where="token_ids", hint="pass at least one token")
        bad = [t for t in token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} outside the vocabulary (size {vocab})", where="token_ids")


def _load_codec(manifest: Manifest):
    """The bundle's tokenizer, read through the verified door; a file tokenizers cannot load, or special-token
    ids of the wrong type, are the bundle's fault (exit 3 naming it), never an internal error."""
    rel = "tokenizer/tokenizer.json"
    if rel not in manifest.files:
        return None
    from tokenizers import Tokenizer

    path = manifest.path(rel, what="tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every malformed file
        raise BundleError(f"{rel} cannot be loaded by tokenizers: {str(exc)[:200]}", where=str(path),
                          hint="re-export the bundle from a checkpoint whose tokenizer.json loads") from None
    info = manifest.data.get("tokenizer") or {}
    if not isinstance(info, dict):
        raise BundleError("manifest.json key 'tokenizer' must be an object", where=str(manifest.root), hint=TAMPERED)
    eos_ids = _token_ids(info, "eos_token_id", manifest) | _token_ids(info.get("generation_defaults") or {},
                                                                      "eos_token_id", manifest)
    bos = _token_ids(info, "bos_token_id", manifest)
    recorded = info.get("encoding")  # export records the model's rule; a bundle without it: its post-processor's
    rule = EncodingRule.from_json(recorded) if recorded else encoding_rule_of(tokenizer)
    return TextCodec(tokenizer, min(bos) if bos else None, eos_ids, rule)


def _token_ids(info: dict, key: str, manifest: Manifest) -> set[int]:
    """A token id field (an int, a list of ints, or null) as a set, checked against the vocabulary."""
    value = info.get(key) if isinstance(info, dict) else None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    vocab = int(manifest.contract.model["vocab_size"])
    for ident in ids:
        if not isinstance(ident, int) or isinstance(ident, bool) or not 0 <= ident < vocab:
            raise BundleError(f"manifest.json tokenizer {key} {ident!r} is not a token id of this vocabulary "
                              f"(0..{vocab - 1})", where=str(manifest.root), hint=TAMPERED)
    return set(ids)
