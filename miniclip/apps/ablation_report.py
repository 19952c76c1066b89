"""The report of an ablation grid (ablate.py): `ablation.md` (final metrics, mean ± std over seeds, the best value
of each column in bold), `ablation.csv` (the same numbers), `ablation_runs.csv` (one row per run) and
`ablation.png` (each variant's eval recall and training loss against steps, from the runs' trainer_state.json).
Leaves out on purpose: significance tests (a handful of seeds cannot carry them; the std is shown instead).
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from miniclip.files import atomic_write, atomic_write_text

DONE = "ablate_done.json"  # written last by ablate.execute: a run folder without it is unfinished
RECALL_ORDER = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mean_recall")
TAIL_COLUMNS = ("train_loss", "logit_scale", "train_runtime")
LOWER_IS_BETTER = ("median_rank", "runtime")  # name endings
# Reported, not ranked: the final temperature is an outcome, not a score; and the contrastive loss is not comparable
# across variants (its chance level is ln(batch size), and a fixed logit scale of 1 pins it near that level).
NOT_RANKED = ("logit_scale", "epoch", "train_loss", "loss")


def read_run(folder: Path) -> dict:
    """A finished run: its DONE marker (variant, seed, metrics) plus the Trainer's log history."""
    done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    state = folder / "trainer_state.json"
    done["log_history"] = json.loads(state.read_text(encoding="utf-8")).get("log_history", []) if state.is_file() else []
    done["dir"] = str(folder)
    return done


def default_metrics(records: list[dict]) -> list[str]:
    """Recalls of the eval (then test) split in the usual order, then loss, final logit scale, runtime."""
    present = {k for r in records for k in r["metrics"]}
    columns = [f"{split}_{name}" for split in ("eval", "test") for name in RECALL_ORDER
               if f"{split}_{name}" in present]
    return columns + [k for k in TAIL_COLUMNS if k in present]


def direction(metric: str) -> int:
    """+1 higher is better, -1 lower is better, 0 not ranked."""
    if metric in NOT_RANKED or metric.endswith("_loss"):
        return 0
    return -1 if metric.endswith(LOWER_IS_BETTER) else 1


def aggregate(records: list[dict], metrics: list[str]) -> list[dict]:
    """One row per variant (in first-seen order): {"variant", "seeds", metric: (mean, std, n)}; std is the sample
    standard deviation over seeds (0 with one seed); a metric a run lacks is left out of its mean."""
    rows = {}
    for record in records:
        rows.setdefault(record["variant"], []).append(record)
    table = []
    for variant, group in rows.items():
        row = {"variant": variant, "seeds": sorted(r["seed"] for r in group)}
        for metric in metrics:
            values = [float(r["metrics"][metric]) for r in group
                      if isinstance(r["metrics"].get(metric), (int, float)) and math.isfinite(r["metrics"][metric])]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[metric] = (statistics.fmean(values), std, len(values))
        table.append(row)
    return table


def best_variants(table: list[dict], metric: str) -> set[str]:
    """Variants whose mean is the best of the column (ties: all of them); empty for unranked metrics."""
    sign = direction(metric)
    means = {row["variant"]: row[metric][0] for row in table if metric in row}
    if sign == 0 or len(means) < 2:
        return set()
    best = max(sign * m for m in means.values())
    return {v for v, m in means.items() if abs(sign * m - best) <= 1e-9 * max(1.0, abs(best))}


def _fmt(metric: str, value: float) -> str:
    digits = 3 if metric.endswith("loss") else 0 if metric.endswith("runtime") else 2
    return f"{value:.{digits}f}"


def markdown_table(table: list[dict], metrics: list[str]) -> str:
    header = "| variant | seeds | " + " | ".join(m.replace("|", "/") for m in metrics) + " |"
    lines = [header, "|" + " --- |" * (len(metrics) + 2)]
    best = {m: best_variants(table, m) for m in metrics}
    for row in table:
        cells = []
        for metric in metrics:
            if metric not in row:
                cells.append("–")
                continue
            mean, std, n = row[metric]
            text = _fmt(metric, mean) + (f" ± {_fmt(metric, std)}" if n > 1 else "")
            cells.append(f"**{text}**" if row["variant"] in best[metric] else text)
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def markdown(grid, table: list[dict], metrics: list[str], records: list[dict]) -> str:
    overrides = "\n".join(f"- `{name}`: " + (", ".join(f"`{k}={v}`" for k, v in o.items()) or "(base)")
                          for name, o in grid.variants.items())
    base = ", ".join(f"`{k}={v}`" for k, v in grid.base.items())
    intro = f"{grid.description.strip()}\n\n" if grid.description.strip() else ""
    return (f"# Ablation: {grid.name}\n\n{intro}"
            f"{len(records)} finished runs; seeds {grid.seeds}. Final metrics, mean ± sample std over seeds; the best "
            "mean of each column is **bold** (higher recall, lower rank / runtime). Not ranked: `logit_scale` (the "
            "final multiplier exp(t)) and losses (their chance level ln(B) differs between batch sizes and "
            "temperatures).\n\n" + markdown_table(table, metrics) +
            f"\n\nBase arguments: {base}\n\nVariants:\n{overrides}\n\n![curves](ablation.png)\n")


def write_report(grid, runs) -> list[Path]:
    """Write ablation.md, ablation.csv, ablation_runs.csv and ablation.png into grid.output_dir."""
    records = [read_run(run.dir) for run in runs]
    metrics = grid.metrics or default_metrics(records)
    table = aggregate(records, metrics)
    out = grid.output_dir
    atomic_write_text(out / "ablation.md", markdown(grid, table, metrics, records))
    rows = [["variant", "n_seeds", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], *[f"{m}_best"
             for m in metrics]]]
    best = {m: best_variants(table, m) for m in metrics}
    for row in table:
        values = [x for m in metrics for x in ((row[m][0], row[m][1]) if m in row else ("", ""))]
        rows.append([row["variant"], len(row["seeds"]), *values, *[int(row["variant"] in best[m]) for m in metrics]])
    atomic_write_text(out / "ablation.csv", _csv(rows))
    per_run = [["variant", "seed", "dir", *metrics]] + [
        [r["variant"], r["seed"], r["dir"], *[r["metrics"].get(m, "") for m in metrics]] for r in records]
    atomic_write_text(out / "ablation_runs.csv", _csv(per_run))
    plot_seed_curves(records, grid.curve_metric, out / "ablation.png", title=grid.name)
    return [out / "ablation.md", out / "ablation.csv", out / "ablation_runs.csv", out / "ablation.png"]


# --- curves -----------------------------------------------------------------------------------------------------------
def curve(record: dict, key: str) -> dict[int, float]:
    """step -> value of `key` from the run's log history; for eval metrics also the final evaluation (which train.py
    runs after saving trainer_state.json) at the last step."""
    points = {int(e["step"]): float(e[key]) for e in record["log_history"] if key in e and "step" in e}
    steps = [int(e["step"]) for e in record["log_history"] if "step" in e]
    final = record["metrics"].get(key)
    if not key.startswith("train") and final is not None and steps and max(steps) not in points:
        points[max(steps)] = float(final)
    return dict(sorted(points.items()))


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted({s for c in curves for s in c})
    return steps, [statistics.fmean(c[s] for c in curves if s in c) for s in steps]


def plot_seed_curves(records: list[dict], recall_key: str, path: Path, title: str = "") -> Path:
    """Two panels: `recall_key` and training loss against steps; one colour per variant, thin lines per seed and
    a thick line for the mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    variants = list(dict.fromkeys(r["variant"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, (recall_key, "loss")):
        for i, variant in enumerate(variants):
            color = f"C{i % 10}"
            curves = [c for c in (curve(r, key) for r in records if r["variant"] == variant) if c]
            for c in (curves if len(curves) > 1 else []):
                ax.plot(list(c), list(c.values()), color=color, alpha=0.25, linewidth=0.8)
            if curves:
                steps, mean = _mean_curve(curves)
                ax.plot(steps, mean, color=color, linewidth=2, label=variant,
                        marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key} (eval)" if key != "loss" else "training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds (thin: single seeds)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
