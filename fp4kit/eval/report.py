"""Compare result files: a markdown table with recovery against the first (base) file, and a plot.

Recovery of a metric where higher is better (accuracy) is value / base; for perplexity, where
lower is better, it is base / value. Both read as "% of the base model's quality kept". Where both
records hold per-item scores on the same items (`items`), the recovery gets a paired standard error,
100 * se(x_i - b_i) / base: the comparison's own uncertainty, smaller than the two runs' stderrs combined.
"""

from __future__ import annotations

from .scoring import paired_stderr


def group_runs(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Split records into runs by (model, format, method, attention, checkpoint_hash), in order of first appearance.

    `fp4kit eval --json` appends, so one file often holds an original and its quantized versions.
    """
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        attention = r.get("attention", "dense")
        key = (r.get("model", "?"), r.get("format", ""), r.get("method", ""), "" if attention == "dense" else attention,
               r.get("checkpoint_hash", ""))
        runs.setdefault(key, []).append(r)
    return [(" ".join(str(k) for k in key[:4] if k), recs) for key, recs in runs.items()]


def recovery(metric: str, value: float, base: float) -> float:
    if metric == "perplexity":
        return 100.0 * base / value
    return 100.0 * value / base if base else float("nan")


def compare_table(runs: list[tuple[str, list[dict]]]) -> str:
    """runs: [(label, records)], the first is the base."""
    keys = []
    for _, recs in runs:
        for r in recs:
            if (r["task"], r["metric"]) not in keys:
                keys.append((r["task"], r["metric"]))
    header = "| task | metric | " + " | ".join(label for label, _ in runs) + " |"
    lines = [header, "|---|---|" + "---|" * len(runs)]
    base = {(r["task"], r["metric"]): r for r in runs[0][1]}
    for task, metric in keys:
        cells = []
        for i, (_, recs) in enumerate(runs):
            r = next((r for r in recs if (r["task"], r["metric"]) == (task, metric)), None)
            if r is None:
                cells.append("-")
                continue
            v = f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r.get("stderr") else "")
            if i and (task, metric) in base:
                b = base[(task, metric)]
                se = paired_stderr(r.get("items"), b.get("items"))
                paired = f" ± {100 * se / b['value']:.1f}" if se is not None and b["value"] else ""
                v += f" ({recovery(metric, r['value'], b['value']):.1f}%{paired})"
            cells.append(v)
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_plot(runs: list[tuple[str, list[dict]]], path) -> None:
    """Left: recovery % per task (main metric) for each non-base run. Right: perplexities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {(r["task"], r["metric"]): r["value"] for r in runs[0][1]}
    main = [(t, m) for (t, m) in base if m in ("acc_norm", "exact_match") or
            (m == "acc" and (t, "acc_norm") not in base)]
    ppl = [(t, m) for (t, m) in base if m == "perplexity"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(main), 1), max(len(ppl), 1)]})
    width = 0.8 / max(len(runs) - 1, 1)
    for i, (label, recs) in enumerate(runs[1:]):
        vals = {(r["task"], r["metric"]): r["value"] for r in recs}
        ys = [recovery(m, vals.get((t, m), float("nan")), base[(t, m)]) for t, m in main]
        axes[0].bar([k + i * width for k in range(len(main))], ys, width, label=label, color=f"C{i + 1}")
    axes[0].axhline(100, color="black", lw=0.8)
    axes[0].set_xticks([k + width * (len(runs) - 2) / 2 for k in range(len(main))])
    axes[0].set_xticklabels([f"{t}\n{m}" for t, m in main], fontsize=8)
    axes[0].set_ylabel(f"% of {runs[0][0]}")
    axes[0].set_title("accuracy recovery")
    axes[0].legend(fontsize=8)
    width = 0.8 / len(runs)
    for i, (label, recs) in enumerate(runs):
        vals = {(r["task"], r["metric"]): r["value"] for r in recs}
        axes[1].bar([k + i * width for k in range(len(ppl))], [vals.get(k, float("nan")) for k in ppl], width,
                    label=label, color=f"C{i}")
    axes[1].set_xticks([k + width * (len(runs) - 1) / 2 for k in range(len(ppl))])
    axes[1].set_xticklabels([t for t, _ in ppl], fontsize=8)
    axes[1].set_title("perplexity (lower is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
