"""Calibration text and the statistics compress gathers from it, one decoder layer at a time.

Text: the built-in ``data/calibration.txt`` (Python 3.11 documentation pages, provenance in
``data/SOURCE.md``) or the user's UTF-8 file. Its token ids are cut into windows of ``seq_len``: the first
``calib_tokens`` calibrate, the *last* windows (never used for calibration) measure held-out quality.

Statistics: per-linear input second moments (GPTQ's Hessian H ∝ Σ x xᵀ, arXiv:2210.17323 §3) through
forward pre-hooks, and for MoE layers the router's choices and the MoE input, from which every routed
expert's statistics are computed on its own (transformers 5 fuses experts into one module, so hooks on
``nn.Linear`` never see them).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from dsedge.compress.quant import HessianAccumulator
from dsedge.errors import UserError

log = logging.getLogger("dsedge")

BUILTIN_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.txt"
MIN_CALIB_TOKENS = 16


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows for calibration ``[N, S]`` and for held-out evaluation ``[M, S]`` (disjoint)."""

    source: str
    sha256: str
    seq_len: int
    calib: object  # torch.LongTensor [N, S]
    heldout: object  # torch.LongTensor [M, S]
    text_tokens: int

    def to_json(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "seq_len": self.seq_len,
                "calib_sequences": int(self.calib.shape[0]), "calib_tokens": int(self.calib.numel()),
                "heldout_sequences": int(self.heldout.shape[0]), "heldout_tokens": int(self.heldout.numel()),
                "text_tokens": self.text_tokens}


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, source label) of a calibration file, or of the built-in text when ``path`` is None."""
    if path is None:
        return BUILTIN_CALIBRATION.read_text(encoding="utf-8"), "builtin:python-3.11-docs"
    file = Path(path)
    if not file.is_file():
        raise UserError("calibration file not found", where=str(file), hint="pass a UTF-8 text file to --calib")
    data = file.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise UserError("calibration file looks binary (it holds NUL bytes)", where=str(file),
                        hint="--calib takes plain UTF-8 text, e.g. documents like the ones the model will see")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"calibration file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        where=str(file), hint="convert it to UTF-8 (e.g. iconv -t utf-8)") from None
    if not text.strip():
        raise UserError("calibration file is empty", where=str(file), hint="pass a file with text in it")
    return text, str(file)


def load_calibration(tokenizer_json: Path, calib: str | Path | None, *, calib_tokens: int, heldout_tokens: int,
                     seq_len: int) -> CalibrationSet:
    """Tokenize the calibration text and cut it into calibration windows and held-out windows (at the end)."""
    if calib_tokens < MIN_CALIB_TOKENS:
        raise UserError(f"--calib-tokens must be at least {MIN_CALIB_TOKENS}, got {calib_tokens}")
    text, source = read_text(calib)
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text).ids
    seq_len = min(seq_len, calib_tokens)
    n_calib = calib_tokens // seq_len
    n_heldout = max(1, heldout_tokens // seq_len)
    if len(ids) < (n_calib + 1) * seq_len:
        raise UserError(f"calibration text is too short: {len(ids)} tokens, need at least {(n_calib + 1) * seq_len} "
                        f"({n_calib * seq_len} to calibrate plus one held-out window of {seq_len})",
                        where=source, hint="pass a longer --calib file or a smaller --calib-tokens")
    n_heldout = min(n_heldout, len(ids) // seq_len - n_calib)
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len], dtype=torch.long).view(-1, seq_len)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return CalibrationSet(source, digest, seq_len, windows[:n_calib].clone(), windows[-n_heldout:].clone(), len(ids))


# --- statistics ---------------------------------------------------------------------------------


class LinearInputs:
    """Forward pre-hooks accumulating the Hessian of each named ``nn.Linear`` of a layer.

    Linears fed the very same tensor (q/k/v, MLA's q_a/kv_a, an MLP's gate/up) share one accumulator: the
    first batch's inputs are compared by identity (held until that batch ends, so no freed buffer can be
    mistaken for another), which halves Hessian memory and lets GPTQ factor each Hessian once.
    """

    def __init__(self, layer, names: list[str]):
        modules = dict(layer.named_modules())
        self.hessians: dict = {}  # module name -> HessianAccumulator (shared objects for shared inputs)
        self._columns = {n: modules[n].in_features for n in names}
        self._first: list | None = []  # (name, input) of the first batch
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]
        self._handles.append(layer.register_forward_hook(self._end_of_first_batch))

    def _hook(self, name: str):
        def record(module, args):
            x = args[0]
            if name not in self.hessians:
                self.hessians[name] = self._accumulator_for(name, x)
            owner = next(n for n, h in self.hessians.items() if h is self.hessians[name])
            if owner == name:  # a shared accumulator counts each input once
                self.hessians[name].add(x)
        return record

    def _accumulator_for(self, name: str, x):
        shared = next((n for n, seen in self._first or [] if seen is x), None)
        if self._first is not None:
            self._first.append((name, x))
        return self.hessians[shared] if shared else HessianAccumulator(self._columns[name])

    def _end_of_first_batch(self, module, args, output):
        self._first = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class MoEInputs:
    """Captures what a fused-experts module receives: tokens ``[T, H]``, chosen experts and their weights ``[T, k]``."""

    def __init__(self, experts):
        self.hidden, self.index, self.weights = [], [], []
        self._handle = experts.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        hidden, index, weights = args[:3]
        self.hidden.append(hidden.detach().clone())
        self.index.append(index.detach().clone())
        self.weights.append(weights.detach().float().clone())

    def remove(self):
        self._handle.remove()

    def tensors(self):
        return torch.cat(self.hidden), torch.cat(self.index), torch.cat(self.weights)


@dataclass
class ExpertActivity:
    """Per routed expert: routed calibration tokens, and REAP saliency (mean over routed tokens of
    gate weight × ‖expert output‖₂; arXiv:2510.13999), 0 for an expert no token chose."""

    counts: list[int]
    saliency: list[float]

    def to_json(self) -> dict:
        return {"routed_tokens": self.counts, "saliency": [round(s, 6) for s in self.saliency]}


def expert_forward(gate_up, down, x, act):
    """One expert's SwiGLU on rows ``x [T, H]``: (intermediate ``[T, I]``, output ``[T, H]``)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    inter = act(gate) * up
    return inter, F.linear(inter, down)


def routed_rows(index, expert: int):
    """(token rows, top-k slot) of the tokens that chose ``expert``."""
    return (index == expert).nonzero(as_tuple=True)


def expert_activity(experts, hidden, index, weights) -> ExpertActivity:
    """Routing counts and saliency of every routed expert of a held-experts module
    (:class:`dsedge.compress.held.HeldExperts`: one expert upcast at a time)."""
    counts, saliency = [], []
    with torch.no_grad():
        for e in range(experts.num_experts):
            rows, slot = routed_rows(index, e)
            counts.append(int(rows.numel()))
            if rows.numel() == 0:
                saliency.append(0.0)
                continue
            gate_up, down = experts.weights(e)
            _, out = expert_forward(gate_up, down, hidden[rows], experts.act_fn)
            saliency.append(float((weights[rows, slot] * out.norm(dim=-1)).mean()))
    return ExpertActivity(counts, saliency)


def expert_hessians(gate_up, down, hidden, index, expert: int, act, *, min_tokens: int | None,
                    all_tokens_hessian):
    """(H of gate/up input, H of down input, statistics source) for one routed expert.

    ``min_tokens=None`` (the default mode): the expert is calibrated on *all* calibration tokens — its output
    computed on every token, kept out of the forward. Those are the same post-attention hidden states the
    router picks its tokens from; their Hessian is full-rank, so GPTQ can neither wipe a column nor overfit
    the few hundred tokens a fine-grained expert gets (measured in docs/compress.md: on the demo MoE, GPTQ on
    routed tokens only is *worse* than RTN on held-out tokens, GPTQ on all tokens better than both).
    With ``min_tokens``, an expert with at least that many routed tokens is calibrated on them alone, and one
    with fewer on all tokens.
    """
    rows, _ = routed_rows(index, expert)
    routed = min_tokens is not None and rows.numel() >= min_tokens
    x = hidden[rows] if routed else hidden
    with torch.no_grad():
        inter, _ = expert_forward(gate_up, down, x, act)
    h_down = HessianAccumulator(inter.shape[-1])
    h_down.add(inter)
    if not routed:
        return all_tokens_hessian, h_down, "all-tokens"
    h_in = HessianAccumulator(x.shape[-1])
    h_in.add(x)
    return h_in, h_down, "routed"
