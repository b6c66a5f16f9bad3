"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a few counters,
gauges and two histograms do not justify a dependency. Updated from the worker thread and the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable

PREFIX = "dsedge_serve"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; cumulated when rendered
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What /metrics reports. ``queue_depth``, ``active``, ``expert_cache`` and ``prompt_cache`` (a
    ``PrefixCacheStats`` or None) are read when rendered."""

    def __init__(self, *, queue_depth: Callable[[], int] = lambda: 0, active: Callable[[], int] = lambda: 0,
                 expert_cache: Callable[[], tuple[int, int] | None] = lambda: None,
                 prompt_cache: Callable[[], object | None] = lambda: None):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = self.generated_tokens = 0
        # speculative decoding, summed over the generations that completed: verify steps, the tokens they
        # produced, the draft tokens proposed and those accepted
        self.verify_steps = self.speculative_tokens = self.drafted_tokens = self.accepted_tokens = 0
        self.ttft, self.token_latency = Histogram(TTFT_BUCKETS), Histogram(TOKEN_BUCKETS)
        self._queue_depth, self._active, self._expert_cache = queue_depth, active, expert_cache
        self._prompt_cache = prompt_cache

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def count_speculation(self, stats) -> None:
        """One completed generation's ``SpeculationStats`` (None: speculation off)."""
        if stats is None:
            return
        with self._lock:
            self.verify_steps += stats.forwards
            self.speculative_tokens += stats.tokens
            self.drafted_tokens += sum(stats.drafted)
            self.accepted_tokens += sum(stats.accepted)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_token_latency(self, seconds: float) -> None:
        with self._lock:
            self.token_latency.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = self._request_lines() + self._token_lines() + self._gauge_lines()
            lines += _family("ttft_seconds", "histogram", "time from request arrival to the first token",
                             self.ttft.lines(f"{PREFIX}_ttft_seconds"))
            lines += _family("token_latency_seconds", "histogram", "time between consecutive decode steps",
                             self.token_latency.lines(f"{PREFIX}_token_latency_seconds"))
        return "\n".join(lines) + "\n"

    def _request_lines(self) -> list[str]:
        samples = [f'{PREFIX}_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                   for (e, s), n in sorted(self.requests.items())]
        return _family("requests_total", "counter", "requests answered, by endpoint and HTTP status", samples)

    def _token_lines(self) -> list[str]:
        return (_family("prompt_tokens_total", "counter", "prompt tokens processed",
                        [f"{PREFIX}_prompt_tokens_total {self.prompt_tokens}"])
                + _family("generated_tokens_total", "counter", "tokens generated",
                          [f"{PREFIX}_generated_tokens_total {self.generated_tokens}"])
                + self._prompt_cache_lines() + self._speculation_lines())

    def _speculation_lines(self) -> list[str]:
        counters = (("speculative_verify_steps_total", "speculative decoding verify steps (main-model forwards)",
                     self.verify_steps),
                    ("speculative_tokens_total", "tokens those verify steps produced", self.speculative_tokens),
                    ("speculative_drafted_tokens_total", "draft tokens proposed", self.drafted_tokens),
                    ("speculative_accepted_tokens_total", "draft tokens accepted", self.accepted_tokens))
        return [line for name, help_text, value in counters
                for line in _family(name, "counter", help_text, [f"{PREFIX}_{name} {value}"])]

    def _prompt_cache_lines(self) -> list[str]:
        stats = self._prompt_cache()
        hits, reused, held, evicted = ((stats.hits, stats.reused_tokens, stats.bytes, stats.evicted_blocks)
                                       if stats is not None else (0, 0, 0, 0))
        return (_family("prompt_cache_hits_total", "counter", "prompts that started from the prompt cache",
                        [f"{PREFIX}_prompt_cache_hits_total {hits}"])
                + _family("prompt_cache_tokens_total", "counter", "prompt tokens taken from the prompt cache "
                          "instead of prefilled", [f"{PREFIX}_prompt_cache_tokens_total {reused}"])
                + _family("prompt_cache_bytes", "gauge", "bytes of cache entries the prompt cache holds",
                          [f"{PREFIX}_prompt_cache_bytes {held}"])
                + _family("prompt_cache_evicted_blocks_total", "counter", "prompt cache blocks evicted (LRU)",
                          [f"{PREFIX}_prompt_cache_evicted_blocks_total {evicted}"]))

    def _gauge_lines(self) -> list[str]:
        lines = (_family("queue_depth", "gauge", "requests waiting for a slot",
                         [f"{PREFIX}_queue_depth {self._queue_depth()}"])
                 + _family("active_generations", "gauge", "generations holding a slot",
                           [f"{PREFIX}_active_generations {self._active()}"]))
        experts = self._expert_cache()
        if experts is not None:
            hits, misses = experts
            lines += _family("expert_cache_hits_total", "counter", "expert partitions found loaded",
                             [f"{PREFIX}_expert_cache_hits_total {hits}"])
            lines += _family("expert_cache_misses_total", "counter", "expert partitions loaded on demand",
                             [f"{PREFIX}_expert_cache_misses_total {misses}"])
        return lines


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} {kind}", *samples]
