"""How one weight matrix is quantized: :class:`QuantScheme`, a frozen, strictly parsed config object.

Torch-free, so recipes and the checkpoint reader can use it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsedge.errors import UserError

BITS = (4, 8)
METHODS = ("rtn", "gptq")
_KEYS = ("bits", "group_size", "symmetric", "method", "act_order", "damp")


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization of a 2-D ``[out, in]`` weight.

    ``group_size`` consecutive input columns share a scale (the last group may be shorter);
    ``None`` means one scale per output channel. ``act_order`` and ``damp`` only matter for GPTQ.
    """

    bits: int  # 4 or 8
    group_size: int | None  # 32/64/128 usually (any positive int works); None = per output channel
    symmetric: bool = True
    method: str = "rtn"  # "rtn" | "gptq"
    act_order: bool = False  # GPTQ only: process columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ only: fraction of the mean Hessian diagonal added to the diagonal

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise UserError(f"invalid quantization scheme: {problem}", where=repr(self.to_json()),
                            hint="bits is 4 or 8; group_size a positive integer or null (per channel); "
                                 "method 'rtn' or 'gptq'; damp in (0, 1]")

    @property
    def label(self) -> str:
        """Short human name, e.g. ``int4-g128``, ``int8-ch-asym``, ``int4-g32-gptq-act``."""
        parts = [f"int{self.bits}", f"g{self.group_size}" if self.group_size else "ch"]
        if not self.symmetric:
            parts.append("asym")
        if self.method == "gptq":
            parts.append("gptq-act" if self.act_order else "gptq")
        return "-".join(parts)

    def with_method(self, method: str) -> QuantScheme:
        return _replace(self, method=method)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "method": self.method, "act_order": self.act_order, "damp": self.damp}

    @classmethod
    def from_json(cls, data: Any, where: str = "quantization scheme") -> QuantScheme:
        """Strict: unknown keys, a missing ``bits`` or bad values raise :class:`UserError`."""
        if not isinstance(data, dict):
            raise UserError(f"a quantization scheme must be an object, got {type(data).__name__}", where=where,
                            hint='write e.g. {"bits": 4, "group_size": 128}')
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(map(repr, unknown))} in a quantization scheme",
                            where=where, hint=f"allowed keys: {', '.join(_KEYS)}")
        if "bits" not in data:
            raise UserError("a quantization scheme needs 'bits'", where=where, hint="add \"bits\": 4 or 8")
        fields = {k: data[k] for k in _KEYS if k in data}
        fields.setdefault("group_size", None)
        try:
            return cls(**fields)
        except UserError as exc:
            raise UserError(exc.what, where=where, hint=exc.hint) from None


def _replace(scheme: QuantScheme, **changes) -> QuantScheme:
    return QuantScheme(**{**scheme.to_json(), **changes})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(s: QuantScheme) -> str | None:
    if not _is_int(s.bits) or s.bits not in BITS:
        return f"bits must be one of {BITS}, got {s.bits!r}"
    if s.group_size is not None and (not _is_int(s.group_size) or s.group_size <= 0):
        return f"group_size must be a positive integer or null, got {s.group_size!r}"
    if not isinstance(s.symmetric, bool):
        return f"symmetric must be true or false, got {s.symmetric!r}"
    if s.method not in METHODS:
        return f"method must be one of {METHODS}, got {s.method!r}"
    if not isinstance(s.act_order, bool):
        return f"act_order must be true or false, got {s.act_order!r}"
    if isinstance(s.damp, bool) or not isinstance(s.damp, (int, float)) or not 0 < s.damp <= 1:
        return f"damp must be a number in (0, 1], got {s.damp!r}"
    return None
