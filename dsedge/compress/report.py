"""What `dsedge compress` reports: the typed report (compress_report.json) and the held-out quality measures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsedge.compress.layers import final_logits
from dsedge.evaluation import evaluate_perplexity

REPORT_FILE = "compress_report.json"
REPORT_SCHEMA_VERSION = 1


@dataclass
class CompressReport:
    """What `compress` did: per-layer weight SQNR, sizes, experts kept, calibration, quality, time and memory."""

    checkpoint: str
    output: str
    model_type: str
    recipe: dict[str, Any]
    method: str | None
    layers: list[dict[str, Any]]
    bytes_before: int
    bytes_after: int
    quantized_modules: int
    quantized_experts: int
    pruning: dict[str, Any] | None
    calibration: dict[str, Any]
    quality: dict[str, Any] | None
    elapsed_s: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)
    lm_head: dict[str, Any] | None = None  # scheme and SQNR when the recipe quantized the LM head

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **self.__dict__}

    def summary(self) -> str:
        """A few human lines: sizes, SQNR range, experts, quality."""
        sqnr = [m["sqnr_db"] for layer in self.layers for m in layer["modules"].values() if m["sqnr_db"] is not None]
        lines = [f"compressed {self.checkpoint} -> {self.output}",
                 f"  size {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                 f"({self.bytes_after / max(self.bytes_before, 1):.1%})",
                 f"  recipe {self.recipe['name']}, {self.quantized_modules} linears quantized "
                 f"({self.quantized_experts} routed experts)"]
        if sqnr:
            lines.append(f"  weight SQNR {min(sqnr):.1f} dB min, {sum(sqnr) / len(sqnr):.1f} dB mean")
        if self.pruning:
            lines.append(f"  experts {self.pruning['experts_before']} -> {self.pruning['experts_after']} per MoE layer")
        if self.quality:
            q, c = self.quality, self.calibration
            lines.append(f"  calib-tail perplexity {q['original']['perplexity']:.3f} -> "
                         f"{q['compressed']['perplexity']:.3f}, top-1 agreement {q['top1_agreement']:.2%}")
            lines.append(f"    (calib-tail: the last {c['heldout_sequences']} x {c['seq_len']} = {q['heldout_tokens']} "
                         f"tokens of {c['source']}, never used to calibrate)")
        lines.append(f"  {self.elapsed_s:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
        return "\n".join(lines)


def quality(h_orig, h_comp, heldout_ids, norm, head, eps, norm_class, batch_size: int, head_comp=None) -> dict:
    """Held-out perplexity and top-1 accuracy of both models (dsedge.evaluation), and how often their
    next-token argmax agrees, from the final hidden states of the held-out windows. ``head_comp``: the
    compressed model's LM head when the recipe quantized it (dequantized), else the original's."""
    head_comp = head if head_comp is None else head_comp
    agree, total = 0, 0
    for start in range(0, h_orig.shape[0], batch_size):
        a = final_logits(h_orig[start:start + batch_size], norm, head, eps, norm_class)[:, :-1].argmax(-1)
        b = final_logits(h_comp[start:start + batch_size], norm, head_comp, eps, norm_class)[:, :-1].argmax(-1)
        agree, total = agree + int((a == b).sum()), total + a.numel()
    ids = heldout_ids.reshape(-1).tolist()
    window = heldout_ids.shape[1]
    reports = {}
    for label, hidden, weight in (("original", h_orig, head), ("compressed", h_comp, head_comp)):
        fn = _windowed_logits_fn(hidden, norm, weight, eps, norm_class)
        reports[label] = evaluate_perplexity(fn, ids, window=window, batch_size=batch_size).to_json()
    return {**reports, "top1_agreement": agree / max(total, 1), "heldout_tokens": int(heldout_ids.numel()),
            "delta_perplexity": reports["compressed"]["perplexity"] - reports["original"]["perplexity"]}


def _windowed_logits_fn(hidden, norm, head, eps, norm_class):
    """A logits_fn serving the precomputed windows in the order evaluate_perplexity asks for them."""
    position = [0]

    def logits_fn(batch):
        start = position[0]
        position[0] += len(batch)
        return final_logits(hidden[start:start + len(batch)], norm, head, eps, norm_class).numpy()

    return logits_fn
