"""The analyze plot: a PNG from which a person can read a run's health at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcrollout.analyze import Analysis, fmt_pct, fraction


def plot_report(r: dict[str, Any], analysis: Analysis, path: str | Path) -> None:
    """A 2x2 PNG: token and char histograms (max_tokens marked), finish reasons, per-prompt diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_tok, ax_chr), (ax_fin, ax_div) = axes
    for ax, hist, what in ((ax_tok, analysis.tokens, "response tokens"), (ax_chr, analysis.chars, "response chars")):
        edges, heights = hist.bins()
        ax.stairs(heights, edges, fill=True, color="#4878a8")
        s = hist.summary()
        ax.set_title(
            f"{what}: p50 {s['p50'] or 0:,.0f}  p90 {s['p90'] or 0:,.0f}  p99 {s['p99'] or 0:,.0f}  "
            f"max {s['max'] or 0:,}"
        )
        ax.set_xlabel(what)
        ax.set_ylabel("responses")
        for q, style in (("p50", ":"), ("p90", "--")):
            if s[q] is not None:
                ax.axvline(s[q], color="gray", linestyle=style, linewidth=1, label=f"{q} {s[q]:,.0f}")
        if what == "response tokens" and r["max_tokens"]:
            ax.axvline(
                r["max_tokens"],
                color="crimson",
                linewidth=2,
                label=f"max_tokens {r['max_tokens']:,}: {fmt_pct(r['hit_max_tokens_frac'])} hit it",
            )
        if hist.count:
            ax.legend(loc="best", fontsize=8, framealpha=0.8)
    names = list(r["finish_reasons"]) or ["(none)"]
    counts = [r["finish_reasons"].get(n, 0) for n in names]
    colors = ["crimson" if n == "length" else "#6a9955" if n == "stop" else "#c08a30" for n in names]
    shares = [fmt_pct(fraction(c, r["responses"])) for c in counts]
    if r["error_rows"]:  # failed prompts have no finish reason: show them beside, so they are not missed
        names.append("error (prompts)")
        counts.append(r["error_rows"])
        colors.append("dimgray")
        shares.append(f"{fmt_pct(fraction(r['error_rows'], r['prompts'] or r['rows']))} of prompts")
    bars = ax_fin.bar(names, counts, color=colors)
    for b, c, share in zip(bars, counts, shares, strict=True):
        ax_fin.annotate(
            f"{c:,}\n{share}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_fin.set_title("finish reasons (length = hit max_tokens)")
    ax_fin.set_ylabel("responses")
    ax_fin.margins(y=0.2)
    dv = r["diversity"]
    if dv and dv["distinct_of_n"]:
        counts_by = dict(dv["distinct_of_n"])
        ns = {key.split("/")[1] for key in counts_by}
        if len(ns) == 1 and int(next(iter(ns))) <= 32:  # one n: show every outcome 1/n..n/n, zeros included
            n = int(next(iter(ns)))
            counts_by = {f"{d}/{n}": counts_by.get(f"{d}/{n}", 0) for d in range(1, n + 1)}
        labels = list(counts_by)
        # Numeric positions: matplotlib would read labels like "1/4" as dates.
        ax_div.bar(range(len(labels)), list(counts_by.values()), color="#8064a2", tick_label=labels)
        ax_div.set_title(f"distinct responses per prompt (mean distinct/n {fmt_pct(dv['mean_distinct_frac'])})")
        ax_div.set_xlabel("distinct / n")
        ax_div.set_ylabel("prompts")
        if len(labels) > 12:
            ax_div.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax_div.set_xlim(-0.75, max(len(labels), 4) - 0.25)  # a lone bar should not fill the panel
    else:
        ax_div.set_axis_off()
        ax_div.text(0.5, 0.5, "no per-prompt diversity (no uid column or no responses)", ha="center")
    title = (
        f"{Path(r['input']).name}: {r['rows']:,} rows, {r['responses']:,} responses, {r['error_rows']:,} error rows "
        f"({fmt_pct(fraction(r['error_rows'], r['prompts'] or r['rows']))}), empty {fmt_pct(r['empty_frac'])}, "
        f"duplicates {fmt_pct(r['duplicate_frac'])}, hit max_tokens {fmt_pct(r['hit_max_tokens_frac'])}"
    )
    t = r.get("throughput")
    if t:
        title += f"\nshards done {t['shards_done']:,}" + (f"/{t['shards_total']:,}" if t["shards_total"] else "")
        if t["output_tokens_per_s"]:
            title += f", {t['output_tokens_per_s']:,.1f} output tokens/s over {t['wall_s']:,.0f} s wall"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
