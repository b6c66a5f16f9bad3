"""Routed-expert pruning by calibration saliency, equal per router group (DESIGN.md §5).

Saliency is REAP's (Lasby et al., "REAP the Experts", arXiv:2510.13999): the mean over an expert's routed
tokens of its gate weight × the norm of its output; routing frequency breaks ties (an expert no token chose
has saliency 0 and goes first). Group-limited routers (V2 ``group_limited_greedy``, V3 ``noaux_tc``) pick
``topk_group`` of ``n_group`` equal groups, so the same number is removed from every group and the groups stay
equal; top-k must stay reachable from the kept groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsedge.errors import UserError
from dsedge.models.spec import MoESpec


@dataclass(frozen=True)
class PrunePlan:
    """How many routed experts each MoE layer keeps, per group."""

    fraction: float  # asked for
    n_group: int
    per_group_before: int
    per_group_removed: int

    @property
    def experts_before(self) -> int:
        return self.n_group * self.per_group_before

    @property
    def experts_after(self) -> int:
        return self.n_group * (self.per_group_before - self.per_group_removed)

    def to_json(self) -> dict:
        return {"fraction_requested": self.fraction, "n_group": self.n_group, "experts_before": self.experts_before,
                "experts_after": self.experts_after,
                "fraction_removed": round(1 - self.experts_after / self.experts_before, 6)}


def plan_pruning(moe: MoESpec | None, fraction: float) -> PrunePlan | None:
    """⌊fraction·E⌋ experts per layer, rounded to a whole number per group; refuses what routing cannot serve."""
    if fraction == 0:
        return None
    if not 0 < fraction < 1:
        raise UserError(f"--prune-experts must be a fraction in [0, 1), got {fraction}")
    if moe is None:
        raise UserError("--prune-experts needs a mixture-of-experts model; this one is dense",
                        hint="drop --prune-experts for dense models (Qwen/Llama R1-Distills)")
    groups = moe.n_group if moe.routing != "greedy" else 1
    per_group = moe.n_routed_experts // groups
    removed = round(int(fraction * moe.n_routed_experts) / groups)
    plan = PrunePlan(fraction, groups, per_group, removed)
    _check_reachable(moe, plan)
    return plan


def _check_reachable(moe: MoESpec, plan: PrunePlan) -> None:
    left = plan.per_group_before - plan.per_group_removed
    groups_picked = moe.topk_group if plan.n_group > 1 else 1
    reachable = groups_picked * left
    # V3's group score is the sum of a group's top-2 scores: a group needs two experts.
    need_per_group = 2 if moe.routing == "noaux_tc" and plan.n_group > 1 else 1
    if plan.per_group_removed == 0:
        raise UserError(f"--prune-experts {plan.fraction} removes no expert: {moe.n_routed_experts} experts in "
                        f"{plan.n_group} group(s) need whole experts per group",
                        hint=f"use at least {plan.n_group / moe.n_routed_experts:.3f}")
    if reachable < moe.num_experts_per_tok or left < need_per_group:
        raise UserError(f"--prune-experts {plan.fraction} leaves {left} expert(s) per group in {plan.n_group} "
                        f"group(s); routing picks {moe.num_experts_per_tok} from {groups_picked} "
                        f"group(s), so only {reachable} would be reachable",
                        hint="use a smaller fraction")


def choose_kept(plan: PrunePlan, counts: list[int], saliency: list[float]) -> list[int]:
    """Original ids of the experts kept (ascending): the least salient ``per_group_removed`` of each group go."""
    kept = []
    size = plan.per_group_before
    for g in range(plan.n_group):
        ids = range(g * size, (g + 1) * size)
        ranked = sorted(ids, key=lambda e: (saliency[e], counts[e], -e))  # least salient first
        kept += sorted(ranked[plan.per_group_removed:])
    return kept


_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")


def prune_state(state: dict, kept: list[int]) -> dict:
    """A layer's tensors with only ``kept`` routed experts, renumbered 0..len(kept)-1; router rows and the
    V3 correction bias sliced to match. Names are the checkpoint's (per-expert)."""
    new_id = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, tensor in state.items():
        m = _EXPERT.match(name)
        if m:
            e = int(m["e"])
            if e in new_id:
                out[f"{m['prefix']}.{new_id[e]}.{m['rest']}"] = tensor
        elif name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.e_score_correction_bias"):
            out[name] = tensor[kept].clone()
        else:
            out[name] = tensor
    return out
