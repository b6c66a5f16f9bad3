"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), repetition penalty, seeded."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dsedge.errors import UserError

# Logits reach ~1e4 in magnitude; float64 overflows past ~1.8e308, so any temperature above ~1e-300 is finite.
# 1e-6 leaves a wide margin and is already greedy in effect (a 1e-6 logit gap becomes a factor e).
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    repetition_penalty: float = 1.0  # 1 → off
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        checks = [(math.isfinite(t) and t >= 0, f"temperature must be a finite number ≥ 0 (got {t})", None),
                  (t == 0 or t >= MIN_TEMPERATURE,
                   f"temperature {t:g} is below {MIN_TEMPERATURE:g}: dividing logits by it overflows to inf",
                   "pass --temperature 0 for greedy decoding (what so small a temperature amounts to)"),
                  (self.top_k >= 0, "top_k must be ≥ 0", None),
                  (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})", None),
                  (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                   f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty})", None)]
        for ok, message, hint in checks:
            if not ok:
                raise UserError(message, where="sampling parameters", hint=hint)


class Sampler:
    """Picks the next token from logits [V]; one numpy Generator per sampler, so a seed reproduces a run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def __call__(self, logits: np.ndarray, history: Iterable[int] = ()) -> int:
        if self.params.temperature == 0 and self.params.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # the same token as in float64 (an exact widening keeps the order)
        scores = penalize_repetition(logits.astype(np.float64), history, self.params.repetition_penalty)
        if self.params.temperature == 0:
            return int(np.argmax(scores))
        probs = filtered_probs(scores / self.params.temperature, self.params.top_k, self.params.top_p)
        return self.draw(probs)

    def distribution(self, logits: np.ndarray, history: Iterable[int] = ()) -> np.ndarray:
        """The processed distribution [V] that ``__call__`` draws from (penalty, temperature, top-k, top-p);
        one-hot at the argmax when greedy. Speculative decoding accepts drafts against exactly this."""
        scores = penalize_repetition(logits.astype(np.float64), history, self.params.repetition_penalty)
        if self.params.temperature == 0:
            probs = np.zeros(scores.size)
            probs[int(np.argmax(scores))] = 1.0
            return probs
        return filtered_probs(scores / self.params.temperature, self.params.top_k, self.params.top_p)

    def draw(self, probs: np.ndarray) -> int:
        """A token from ``probs`` [V] (summing to 1) with this sampler's generator."""
        return int(self.rng.choice(len(probs), p=probs))

    def uniform(self) -> float:
        """A uniform number in [0, 1) from this sampler's generator (speculative acceptance tests)."""
        return float(self.rng.random())


def penalize_repetition(scores: np.ndarray, history: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL's penalty (Keskar et al. 2019), as transformers applies it: divide positive, multiply negative."""
    if penalty == 1.0:
        return scores
    seen = np.unique(np.fromiter(history, dtype=np.int64))
    if seen.size == 0:
        return scores
    scores = scores.copy()
    picked = scores[seen]
    scores[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return scores


def filtered_probs(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Softmax after keeping the top_k scores and then the smallest set whose mass reaches top_p."""
    if 0 < top_k < scores.size:
        cutoff = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]  # always at least one token
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs
