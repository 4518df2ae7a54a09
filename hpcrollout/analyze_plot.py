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

    scoring = r.get("scoring")
    fig, axes = plt.subplots(2, 3 if scoring else 2, figsize=(19 if scoring else 13, 8.5))
    (ax_tok, ax_chr, *ax_solve), (ax_fin, ax_div, *ax_pass) = axes
    if scoring:
        plot_scoring(scoring, ax_solve[0], ax_pass[0])
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


def plot_scoring(s: dict[str, Any], ax_solve: Any, ax_pass: Any) -> None:
    """Scored input: the solve-rate histogram (prompts per correct/n) and pass@k against k, maj@n marked."""
    counts = dict(s["solve_rate"])
    ns = {int(key.split("/")[1]) for key in counts}
    if len(ns) == 1 and next(iter(ns)) <= 64:  # one n: every outcome 0/n..n/n, zeros included
        n = next(iter(ns))
        counts = {f"{c}/{n}": counts.get(f"{c}/{n}", 0) for c in range(n + 1)}
    if counts:
        labels = list(counts)
        # Numeric positions: matplotlib would read labels like "1/4" as dates.
        colors = [
            "crimson" if k.startswith("0/") else "#6a9955" if k.split("/")[0] == k.split("/")[1] else "#4878a8"
            for k in labels
        ]
        ax_solve.bar(range(len(labels)), list(counts.values()), color=colors, tick_label=labels)
        if len(labels) > 12:
            ax_solve.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax_solve.set_title(
        f"solve rate: never {s['never_solved']:,}, always {s['always_solved']:,} of {s['scored_prompts']:,} prompts"
    )
    ax_solve.set_xlabel("correct / n")
    ax_solve.set_ylabel("prompts")
    ks = [int(k) for k, v in s["pass_at_k"].items() if v["value"] is not None]
    if ks:
        values = [s["pass_at_k"][str(k)]["value"] for k in ks]
        ax_pass.plot(ks, values, marker="o", color="#4878a8", label="pass@k (unbiased)")
        for k, v in zip(ks, values, strict=True):
            ax_pass.annotate(fmt_pct(v), (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        maj = s["maj_at_n"]
        if maj["value"] is not None:
            ax_pass.axhline(
                maj["value"], color="#c08a30", linestyle="--", label=f"maj@{maj['n']} {fmt_pct(maj['value'])}"
            )
        ax_pass.set_xscale("log", base=2)
        ax_pass.set_xticks(ks, [str(k) for k in ks])
        ax_pass.set_ylim(0, 1.12)
        ax_pass.legend(loc="lower right", fontsize=8)
    mean = "-" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
    ax_pass.set_title(f"pass@k; mean score {mean}, correct {fmt_pct(s['accuracy'])}")
    ax_pass.set_xlabel("k")
    ax_pass.set_ylabel("pass@k")
