"""Parameter counts from a spec: total, active per token, per component."""

from __future__ import annotations

from dataclasses import dataclass

from dsedge.models.spec import COMPONENTS, ModelSpec

# What "active" means here, stated once so every report says the same thing.
ACTIVE_NOTE = ("active = parameters one token reads: every non-expert weight and the LM head, plus the "
               "top-k routed experts of each MoE layer; the input embedding is excluded (a lookup reads one "
               "row), as are the MTP modules; a head tied to the embeddings (tie_word_embeddings) is read whole every "
               "token, so it counts as active. This matches DeepSeek's published 37B (V3/R1), 21B (V2) and "
               "2.4B (V2-Lite)")


@dataclass(frozen=True)
class ParamCounts:
    total: int  # the model without MTP (DeepSeek's "671B")
    mtp: int  # MTP module(s) on top (DeepSeek's "685B" = total + mtp)
    active: int  # parameters touched to produce one token, see ACTIVE_NOTE
    by_component: dict[str, int]
    active_by_component: dict[str, int]
    buffers: int = 0  # stored non-parameters (V3's routing correction bias), not in any count above

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    def to_json(self) -> dict:
        return {"total": self.total, "total_with_mtp": self.total_with_mtp, "mtp": self.mtp,
                "active": self.active, "buffers": self.buffers, "by_component": self.by_component,
                "active_by_component": self.active_by_component,
                "note": ACTIVE_NOTE}


def count_params(spec: ModelSpec) -> ParamCounts:
    by_component = dict.fromkeys(COMPONENTS, 0)
    buffers = 0
    for t in spec.expected_tensors(include_mtp=True):
        if t.buffer:
            buffers += t.numel
        else:
            by_component[t.component] += t.numel
    active = {k: v for k, v in by_component.items() if k not in ("mtp", "embeddings")}
    if spec.tie_word_embeddings:  # the one matrix is also the head: every logit reads all of it
        active["head"] = by_component["embeddings"]
    if spec.moe is not None:
        moe = spec.moe
        # Integer arithmetic: every routed expert has the same size.
        active["routed_experts"] = by_component["routed_experts"] * moe.num_experts_per_tok // moe.n_routed_experts
    total = sum(v for k, v in by_component.items() if k != "mtp")
    return ParamCounts(total=total, mtp=by_component["mtp"], active=sum(active.values()),
                       by_component=by_component, active_by_component=active, buffers=buffers)
