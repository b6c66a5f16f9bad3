"""Language-model quality on held-out text: perplexity and top-1 next-token accuracy.

The scorer takes a ``logits_fn`` rather than a model, so the same numbers can be measured on the
transformers reference (``torch_logits_fn``), a compressed checkpoint, or an exported bundle's runtime,
and compared token for token. numpy (and dsedge's own torch-free modules) at module level; torch,
transformers and tokenizers are imported by the functions that need them.

Scoring scheme: the token ids are cut into consecutive, non-overlapping windows of ``window`` tokens
(the last one may be shorter). Each window is run on its own, and every token of it except the first
is scored from the tokens before it in the same window; a window's first token is context only. So
every token of the text except each window's first is scored exactly once, and no score sees more
than ``window - 1`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsedge.demo import heldout_path
from dsedge.errors import UserError
from dsedge.models.reference import load_reference_model
from dsedge.sources import resolve_checkpoint

LogitsFn = Callable[[list[list[int]]], np.ndarray]  # [B][T] token ids -> logits [B, T, V]


@dataclass(frozen=True)
class EvalReport:
    perplexity: float  # exp(nll)
    top1_accuracy: float  # share of scored tokens that are the argmax of their logits
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, in nats

    def to_json(self) -> dict:
        return dict(self.__dict__)


def evaluate_perplexity(logits_fn: LogitsFn, token_ids: Sequence[int], *, window: int,
                        batch_size: int) -> EvalReport:
    """Perplexity and top-1 accuracy of ``logits_fn`` on ``token_ids`` (scheme in the module docstring).

    ``logits_fn`` gets a list of equal-length windows (at most ``batch_size``) and returns float logits
    ``[B, T, V]``; a shorter last window is sent alone.
    """
    if window < 2 or batch_size < 1:
        raise UserError(f"window must be >= 2 and batch_size >= 1, got window={window}, batch_size={batch_size}")
    ids = [int(i) for i in token_ids]
    if len(ids) < 2:
        raise UserError(f"need at least 2 tokens to score, got {len(ids)}")
    total_nll, correct, scored = 0.0, 0, 0
    for batch in _batches(_windows(ids, window), batch_size):
        logits = np.asarray(logits_fn(batch))
        _check_logits(logits, batch)
        for row, targets in zip(logits, batch, strict=True):
            nll, hits = _score_window(row, targets)
            total_nll, correct, scored = total_nll + nll, correct + hits, scored + len(targets) - 1
    mean_nll = total_nll / scored
    return EvalReport(perplexity=math.exp(mean_nll), top1_accuracy=correct / scored, tokens=scored, nll=mean_nll)


def _windows(ids: list[int], window: int) -> list[list[int]]:
    windows = [ids[start:start + window] for start in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]  # a 1-token tail has nothing to score


def _batches(windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Equal-length windows together (all but possibly the last share one length)."""
    full = [w for w in windows if len(w) == len(windows[0])]
    tail = windows[len(full):]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    return batches + ([tail] if tail else [])


def _check_logits(logits: np.ndarray, batch: list[list[int]]) -> None:
    expected = (len(batch), len(batch[0]))
    if logits.ndim != 3 or logits.shape[:2] != expected:
        raise UserError(f"logits_fn returned shape {logits.shape}, expected [{expected[0]}, {expected[1]}, vocab]")
    if max(max(w) for w in batch) >= logits.shape[2]:
        raise UserError(f"token id {max(max(w) for w in batch)} is outside the logits' vocabulary "
                        f"of {logits.shape[2]}", hint="use the tokenizer that belongs to the model")


def _score_window(logits: np.ndarray, tokens: list[int]) -> tuple[float, int]:
    """(summed NLL, correct argmax count) of tokens[1:] given logits[:-1]  (logits [T, V])."""
    predicting = logits[:-1]  # [T-1, V]: position j predicts token j+1
    targets = np.asarray(tokens[1:])
    target_logp = log_softmax(predicting)[np.arange(len(targets)), targets]
    return float(-target_logp.sum()), int((predicting.argmax(axis=-1) == targets).sum())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def unigram_perplexity(train_ids: Sequence[int], heldout_ids: Sequence[int], vocab_size: int) -> float:
    """Perplexity on ``heldout_ids`` of a unigram model counted on ``train_ids``, add-one smoothed.

    p(v) = (count_train(v) + 1) / (len(train_ids) + vocab_size): Laplace smoothing, so a token never
    seen in training still gets a finite probability. Every held-out token is scored. This is the
    context-free baseline a trained model's perplexity must be well below.
    """
    train = np.asarray(train_ids, dtype=np.int64)
    heldout = np.asarray(heldout_ids, dtype=np.int64)
    for name, ids in (("train_ids", train), ("heldout_ids", heldout)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UserError(f"{name} holds ids outside [0, {vocab_size})")
    if heldout.size == 0:
        raise UserError("heldout_ids is empty")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return math.exp(-log_p[heldout].mean())


def torch_logits_fn(model) -> LogitsFn:
    """Adapter: a transformers causal LM as a ``logits_fn`` (float32 numpy logits, no grad, no cache)."""
    import torch  # optional heavy dependency: scoring a runtime's logits needs no torch

    def logits_fn(batch: list[list[int]]) -> np.ndarray:
        with torch.no_grad():
            ids = torch.tensor(batch, dtype=torch.long)
            return model(input_ids=ids, use_cache=False).logits.float().numpy()

    return logits_fn


def encode_text_file(tokenizer_json: str | Path, text_path: str | Path) -> list[int]:
    """Token ids of a UTF-8 text file, bos first (the tokenizer's post-processor adds it)."""
    from tokenizers import Tokenizer  # here: the scorer itself needs only numpy

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return tokenizer.encode(Path(text_path).read_text(encoding="utf-8")).ids


def evaluate_checkpoint(path_or_demo_name: str | Path, text_path: str | Path | None = None, *,
                        window: int = 512, batch_size: int = 8, max_tokens: int | None = None,
                        dtype: str = "float32") -> EvalReport:
    """Perplexity of a checkpoint directory (or shipped demo model name) on a text file.

    The model is loaded with transformers' own class (``load_reference_model``) and the text is
    tokenized with the checkpoint's ``tokenizer.json``; ``text_path`` defaults to the demo held-out
    text, ``max_tokens`` keeps only the first tokens (bos included).
    """
    path = resolve_checkpoint(path_or_demo_name)
    if not (path / "tokenizer.json").is_file():
        raise UserError("checkpoint has no tokenizer.json", where=str(path),
                        hint="evaluation needs the model's own tokenizer next to its weights")
    ids = encode_text_file(path / "tokenizer.json", text_path or heldout_path())
    ids = ids[:max_tokens] if max_tokens else ids
    model = load_reference_model(path, dtype=dtype)
    return evaluate_perplexity(torch_logits_fn(model), ids, window=window, batch_size=batch_size)
