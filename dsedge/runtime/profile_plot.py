"""PNG for `dsedge profile --plot`: latency per stage (TTFT vs decode, time inside vs outside onnxruntime)
and per layer. matplotlib is optional (`pip install dsedge[profile]`); it is imported only here."""

from __future__ import annotations

from pathlib import Path

from dsedge.errors import UserError


def write_plot(report, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("--plot needs matplotlib", where="--plot",
                        hint="pip install 'dsedge[profile]' (or matplotlib)") from exc
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG, got {out.name!r}", where=str(out), hint="name the file *.png")
    fig, (stages, layers) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    _stage_bars(stages, report)
    _layer_bars(layers, report)
    fig.suptitle(f"{Path(report.bundle).name}: {report.layout}, {', '.join(report.providers)}, "
                 f"{report.decode_tokens_per_s:.1f} tokens/s decode, TTFT {report.ttft_ms['p50']:.1f} ms "
                 f"({report.prompt_tokens} prompt tokens)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _stage_bars(ax, report) -> None:
    """Time to first token (retrieval stages, when an index is profiled, then prefill) and one decode step
    (graphs, the runtime's own overhead, expert loads)."""
    stages = []  # (bar, part, ms)
    if report.retrieval:
        q = report.retrieval
        stages += [("TTFT (RAG)", "embed question", q["embed_ms"]), ("TTFT (RAG)", "search", q["search_ms"]),
                   ("TTFT (RAG)", "prompt assembly", q["assembly_ms"]), ("TTFT (RAG)", "prefill", q["prefill_ms"])]
    stages.append(("TTFT", "prefill", report.ttft_ms["p50"]))
    load, outside = report.expert_load_ms_per_token, report.outside_ort_ms_per_token
    stages += [("decode step", "graphs (onnxruntime)", report.decode_ms_per_token["mean"] - outside - load),
               ("decode step", "runtime overhead", outside), ("decode step", "expert partition loads", load)]
    bottoms: dict[str, float] = {}
    colors: dict[str, str] = {}
    for bar, part, ms in stages:
        if ms <= 0:
            continue
        color = colors.setdefault(part, f"C{len(colors)}")
        label = part if part not in ax.get_legend_handles_labels()[1] else None
        ax.bar([bar], [ms], bottom=[bottoms.get(bar, 0.0)], color=color, label=label)
        bottoms[bar] = bottoms.get(bar, 0.0) + ms
    ax.set_ylabel("ms")
    ax.set_title("time to first token and one decode step")
    ax.legend(loc="upper right", fontsize=7)


def _layer_bars(ax, report) -> None:
    rows = report.layers
    if not rows:
        ax.text(0.5, 0.5, "no per-layer data (monolithic bundle: use --by-op)", ha="center", va="center")
        ax.set_axis_off()
        return
    ids = [r["layer"] for r in rows]
    total = [r.get("decode_ms_per_token", r.get("ms_per_token", 0.0)) for r in rows]
    experts = [r.get("experts_ms_per_token", 0.0) for r in rows]
    ax.bar(ids, [t - e for t, e in zip(total, experts, strict=True)], label="attention, router, shared")
    if any(experts):
        ax.bar(ids, experts, bottom=[t - e for t, e in zip(total, experts, strict=True)], label="routed experts")
    ax.set_xlabel("layer")
    ax.set_ylabel("ms per decoded token")
    ax.set_title("decode time per layer")
    ax.legend(fontsize=8)
