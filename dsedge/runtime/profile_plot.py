"""PNG for `dsedge profile --plot`: time to first token and one decode step, each on its own ms axis (a
decode step is ~1/10 of a TTFT: side by side on one axis it was unreadable), split into embedding, layers,
routed experts, LM head and the runtime's own time; and time per layer with the embedding and the LM head.
matplotlib is optional (`pip install dsedge[profile]`); it is imported only here."""

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
    fig = profile_figure(report, plt)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def profile_figure(report, plt):
    """The figure: time to first token and one decode step (each on its own ms axis, left), time per layer
    with the embedding and the LM head (right)."""
    ttft, decode = _ttft_parts(report), _decode_parts(report)
    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.3], height_ratios=[len(ttft) + 1.5, len(decode) + 1.5],
                            hspace=0.45, wspace=0.3)
    _component_bars(fig.add_subplot(grid[0, 0]), ttft,
                    f"time to first token, p50 ({report.prompt_tokens}-token prompt)")
    _component_bars(fig.add_subplot(grid[1, 0]), decode,
                    f"one decode step, mean (p50 {report.decode_ms_per_token['p50']:.3g} ms)")
    _layer_bars(fig.add_subplot(grid[:, 1]), report)
    fig.suptitle(f"{Path(report.bundle).name} ({report.layout}, {', '.join(report.providers)}, "
                 f"{report.threads or 'default'} threads): TTFT {report.ttft_ms['p50']:.1f} ms for "
                 f"{report.prompt_tokens} prompt tokens, decode {report.decode_ms_per_token['p50']:.2f} ms/token "
                 f"p50 = {report.decode_tokens_per_s:,.0f} tokens/s", fontsize=11)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.9, bottom=0.09)
    return fig


# One colour per component in every panel (the per-layer panel uses the same ones).
COLORS = {"embedding": "C0", "attention, router, shared": "C1", "routed experts": "C2", "LM head": "C3",
          "runtime": "C4", "decoder graph": "C7", "prefill": "C9"}


def _component_bars(ax, parts: list[tuple[str, float]], title: str) -> None:
    """One horizontal bar per component, top to bottom in the order they run, each labelled with its ms and
    share: a 0.03 ms part reads as well as a 10 ms one (its own axis, in ms), whatever sits beside it."""
    total = sum(ms for _, ms in parts) or 1.0
    names = [name for name, _ in parts]
    values = [max(ms, 0.0) for _, ms in parts]
    y = list(range(len(parts)))
    ax.barh(y, values, color=[COLORS.get(name.split(" (")[0], f"C{5 + i}") for i, name in enumerate(names)],
            height=0.65)
    for i, ms in zip(y, values, strict=True):
        ax.text(ms, i, f" {ms:.3g} ms ({ms / total:.0%})", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values, default=1.0) * 1.45 or 1.0)  # room for the labels
    ax.set_xlabel(f"ms (total {total:.3g} ms)", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _ttft_parts(report) -> list[tuple[str, float]]:
    """Time to first token: the prefill (after retrieval's stages when an index is profiled)."""
    if report.retrieval:
        q = report.retrieval
        return [("embed question", q["embed_ms"]), ("search", q["search_ms"]), ("prompt assembly", q["assembly_ms"]),
                (f"prefill ({q['prompt_tokens']} tokens)", q["prefill_ms"])]
    return [("prefill", report.ttft_ms["p50"])]


def _decode_parts(report) -> list[tuple[str, float]]:
    """One decode step: embedding, layers (attention/shared, routed experts), LM head, the runtime's own
    overhead and waiting for expert partitions."""
    load, outside = report.expert_load_ms_per_token, report.outside_ort_ms_per_token
    graphs = report.decode_ms_per_token["mean"] - outside - load
    if not report.one_graph:  # graph timers: the layers are everything the graphs took but the ends
        embed, head = report.embed_ms_per_token or 0.0, report.head_ms_per_token or 0.0
        experts = sum(r.get("experts_ms_per_token", 0.0) for r in report.layers)
        parts = [("embedding", embed), ("attention, router, shared", graphs - embed - head - experts),
                 ("routed experts", experts), ("LM head", head)]
    else:  # one graph: its split is known only from the node profile (the per-layer panel)
        parts = [("decoder graph", graphs)]
    parts.append(("runtime (sampling, cache)", outside))
    if load > 0:
        parts.append(("expert partition loads", load))
    return parts


def _layer_bars(ax, report) -> None:
    rows = report.layers
    if not rows:
        ax.text(0.5, 0.5, "no per-layer data (monolithic bundle: use --by-op)", ha="center", va="center")
        ax.set_axis_off()
        return
    names = ["embed"] + [str(r["layer"]) for r in rows] + ["LM head"]
    total = [r.get("decode_ms_per_token", r.get("ms_per_token", 0.0)) for r in rows]
    experts = [r.get("experts_ms_per_token", 0.0) for r in rows]
    trunk = [t - e for t, e in zip(total, experts, strict=True)]
    x = list(range(len(names)))
    split = any(experts)  # partitioned: trunk and expert graphs apart; the node profile sees whole layers
    ax.bar(x[1:-1], trunk, color="C1" if split else "C7",
           label="attention, router, shared experts" if split else "whole layer (attention + MLP/MoE)")
    if split:
        ax.bar(x[1:-1], experts, bottom=trunk, color="C2", label="routed experts")
    ends = [report.embed_ms_per_token, report.head_ms_per_token]
    ax.bar([x[0], x[-1]], [v or 0.0 for v in ends], color=["C0", "C3"])
    for i, value in ((x[0], ends[0]), (x[-1], ends[1])):
        if value is None:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=0 if len(names) <= 16 else 90, fontsize=8 if len(names) <= 40 else 6)
    ax.set_xlabel("layer")
    per = "decoded token" if not report.one_graph else "generated token (node profile, whole trial)"
    ax.set_ylabel(f"ms per {per}")
    ax.set_title("time per layer, with the embedding and the LM head", fontsize=10)
    ax.set_ylim(0, max([*total, *(v or 0.0 for v in ends)], default=1.0) * 1.18)  # the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
