"""Human-readable text for command reports (the CLI prints what these return)."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def describe_routing(moe: dict[str, Any]) -> str:
    base = f"{moe['routing']} ({moe['scoring_func']}), top-{moe['num_experts_per_tok']} of {moe['n_routed_experts']}"
    if moe["routing"] != "greedy":
        base += f", keep {moe['topk_group']} of {moe['n_group']} groups"
    base += f", ×{moe['routed_scaling_factor']:g}"
    if moe["norm_topk_prob"]:
        base += ", renormalized"
    return base + f"; {moe['n_shared_experts']} shared expert(s)"


def describe_attention(spec: dict[str, Any]) -> str:
    mla = spec.get("mla")
    if not mla:
        return (f"GQA {spec['num_attention_heads']} heads / {spec['num_key_value_heads']} KV heads, "
                f"head_dim {spec['head_dim']}")
    q = f"q-LoRA {mla['q_lora_rank']}" if mla["q_lora_rank"] else "no q-LoRA"
    return (f"MLA {spec['num_attention_heads']} heads, {q}, kv_lora {mla['kv_lora_rank']}, nope/rope/v "
            f"{mla['qk_nope_head_dim']}/{mla['qk_rope_head_dim']}/{mla['v_head_dim']}; latent cache "
            f"{mla['latent_cache_width']} values per token per layer")


def _params_lines(params: dict[str, Any]) -> list[str]:
    mtp = f" (+{human_count(params['mtp'])} MTP = {human_count(params['total_with_mtp'])})" if params["mtp"] else ""
    lines = [f"parameters    total {human_count(params['total'])}{mtp}, active per token "
             f"{human_count(params['active'])}"]
    parts = [f"{k} {human_count(v)}" for k, v in params["by_component"].items() if v]
    lines.append("  by part     " + ", ".join(parts))
    lines.append("  note        " + params["note"])
    return lines


def render_inspect(r) -> str:
    spec = r.spec
    lines = [f"checkpoint    {r.path}", f"architecture  {r.model_type}: {r.architecture}",
             f"attention     {describe_attention(spec)}"]
    if spec.get("moe"):
        moe = spec["moe"]
        lines.append(f"routing       {describe_routing(moe)}")
        lines.append(f"layers        {spec['num_hidden_layers']} ({len(moe['moe_layers'])} MoE, "
                     f"{spec['num_hidden_layers'] - len(moe['moe_layers'])} dense)")
    else:
        lines.append(f"layers        {spec['num_hidden_layers']} (dense)")
    lines.append(f"rope          {spec['rope']['type']}, theta {spec['rope']['theta']:g}, "
                 f"factor {spec['rope']['factor']:g}; softmax scale {spec['softmax_scale']:.6f}")
    lines.append(f"MTP           in config: {'yes' if r.mtp_in_config else 'no'}, "
                 f"on disk: {'yes' if r.mtp_on_disk else 'no'}")
    lines += _params_lines(r.params)
    dtypes = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(r.bytes_by_dtype.items()))
    lines.append(f"on disk       {r.files} file(s), {human_bytes(r.bytes_on_disk)}: {dtypes}"
                 + (" (FP8 block-scaled)" if r.fp8 else ""))
    if r.quantized_modules:
        schemes = ", ".join(f"{n} × {label}" for label, n in sorted(r.quantized_modules.items()))
        lines.append(f"quantized     {sum(r.quantized_modules.values())} linears (compressed-tensors pack-quantized): "
                     f"{schemes}")
    lines.append(f"tokenizer     {r.tokenizer or 'not found'}; chat template: {r.chat_template or 'not found'}")
    lines.append(f"validated     {'every tensor matches config.json' if r.validated else 'skipped'}")
    lines += [f"note          {n}" for n in r.notes]
    return "\n".join(lines)


def render_plan(r) -> str:
    p = r.params
    lines = [f"model         {r.model} ({r.model_type})",
             f"parameters    total {human_count(p['total'])}"
             + (f" (+{human_count(p['mtp'])} MTP)" if p["mtp"] else "")
             + f", active per token {human_count(p['active'])}"]
    if r.target:
        t = r.target
        lines.append(f"target        {t['name']}: budget {human_bytes(t['memory_budget_bytes'])}, "
                     f"{t['memory_bandwidth_gbps']:g} GB/s, {', '.join(t['execution_providers'])}")
    lines.append(_kv_line(r))
    lines.append("")
    lines.append(_table([_precision_row(row, r) for row in r.precisions], _precision_header(r)))
    lines.append("")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _kv_line(r) -> str:
    if r.kv_latent_bytes_per_token is not None:
        ratio = r.kv_naive_bytes_per_token / r.kv_latent_bytes_per_token
        return (f"KV cache      latent MLA {human_bytes(r.kv_latent_bytes_per_token)}/token vs naive per-head "
                f"{human_bytes(r.kv_naive_bytes_per_token)}/token ({ratio:.1f}x); at {r.context} tokens: "
                f"{human_bytes(r.kv_bytes_at_context)} (naive {human_bytes(r.kv_naive_bytes_per_token * r.context)})")
    return (f"KV cache      {human_bytes(r.kv_naive_bytes_per_token)}/token (GQA); at {r.context} tokens: "
            f"{human_bytes(r.kv_bytes_at_context)}")


def _precision_header(r) -> list[str]:
    header = ["precision", "weights", "read/token", "run RSS ≈"]
    if r.target:
        header += ["fits", "resident experts", "offloaded", "decode tok/s ≤"]
    return header


def _precision_row(row, r) -> list[str]:
    cells = [row.scheme, human_bytes(row.weight_bytes), human_bytes(row.active_bytes_per_token),
             "-" if row.runtime_rss_bytes is None else human_bytes(row.runtime_rss_bytes)]
    if not r.target:
        return cells
    if row.fits:
        fits = "yes"
    elif row.fits_with_offload:
        fits = "with offload"
    else:
        fits = "no"
    resident = "-" if row.resident_experts is None else f"{row.resident_experts}/{r.total_routed_experts}"
    offloaded = "-" if not row.offloaded_bytes else human_bytes(row.offloaded_bytes)
    return cells + [fits, resident, offloaded, f"{row.decode_tokens_per_s_bound:.1f}"]


def render_targets(targets) -> str:
    rows = [[t.name, t.kind, human_bytes(t.memory_budget_bytes), f"{t.memory_bandwidth_gbps:g} GB/s",
             ",".join(p.replace("ExecutionProvider", "") for p in t.execution_providers),
             ",".join(t.precisions), t.default_recipe, t.description] for t in targets]
    return _table(rows, ["name", "kind", "budget", "bandwidth", "providers", "precisions", "recipe", "description"])


def render_export(r) -> str:
    lines = [f"bundle        {r.output} ({r.layout}, {r.dtype}, max context {r.max_context})",
             f"size          {human_bytes(r.bundle_bytes)} in {len(r.graphs)} graph(s)",
             f"time          {r.elapsed_s:.1f} s, peak RSS {human_bytes(r.peak_rss_bytes)}"]
    for c in r.validation:
        if c["max_abs_err"] is None:
            err = c["detail"]  # whole: "differs (allowed at this precision)" must not be cut
        elif c["tolerance"] is None:  # quantized activations: judged by KL, max abs error shown for reference
            err = f"{c['detail']}, max abs err {c['max_abs_err']:.2e}"
        else:
            err = f"max abs err {c['max_abs_err']:.2e} ≤ {c['tolerance']:g}"
        lines.append(f"validated     {c['name']:22s} {'ok' if c['passed'] else 'FAILED'}  {err}")
    if not r.validation:
        lines.append("validated     skipped (--no-validate)")
    lines += [f"note          {n}" for n in r.notes]
    return "\n".join(lines)
