"""The report of examples/finetune_without_forgetting.sh: one table (target recall, held-out Flickr8k recall, CIFAR-10
zero-shot for the pretrained model, each finetune and WiSE-FT's best alpha) as report.md, and forgetting_curves.png
(the three metrics per evaluation step, one line per finetune).

    python examples/finetune_report.py OUTPUT_DIR

"Best alpha" maximises the average of the target mean recall and the mean of the two held-out scores (Flickr8k mean
recall, CIFAR-10 top-1), WiSE-FT's own criterion; every alpha is listed too. trade_offs.png puts the WiSE-FT curve
and the three finetunes on the same axes.
"""
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = {"plain": "plain finetune", "lit": "LiT (image tower locked)", "layerdecay": "layer-wise lr decay 0.5"}
# (trainer key, WiSE-FT key, column title)
METRICS = [("eval_t2i_R@1", "en_val_t2i_R@1", "shapes t2i R@1"), ("eval_mean_recall", "en_val_mean_recall",
           "shapes mean recall"), ("eval_heldout_t2i_R@5", "en_test_t2i_R@5", "Flickr8k t2i R@5"),
           ("eval_heldout_mean_recall", "en_test_mean_recall", "Flickr8k mean recall"),
           ("eval_zeroshot_top1", "zeroshot_top1", "CIFAR-10 top-1"), ("eval_zeroshot_top5", "zeroshot_top5",
                                                                         "CIFAR-10 top-5")]


def history(out: Path, run: str) -> list[dict]:
    """The evaluations of one run; runs after the first start from its step-0 evaluation (the pretrained model)."""
    state = json.loads((out / run / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_mean_recall" in e]
    if run != "plain" and evals and evals[0]["step"] > 0:
        evals = history(out, "plain")[:1] + evals
    return evals


def main(out: Path) -> None:
    rows = []
    first = history(out, "plain")[0]  # step 0: the pretrained model, evaluated before the first step
    rows.append(("pretrained (step 0)", [first[k] for k, _, _ in METRICS]))
    for run, title in RUNS.items():
        final = json.loads((out / run / "eval_results.json").read_text())
        rows.append((title, [final[k] for k, _, _ in METRICS]))
    sweep = json.loads((out / "wise_ft" / "results.json").read_text())["rows"]
    # WiSE-FT's own criterion (Wortsman et al. 2022): the average of the target ("in distribution") score and the
    # mean of the held-out ("distribution shift") scores.
    best = max(sweep, key=lambda r: (r["en_val_mean_recall"] + (r["en_test_mean_recall"] + r["zeroshot_top1"]) / 2))
    rows.append((f"WiSE-FT alpha={best['alpha']:g} (best)", [best[k] for _, k, _ in METRICS]))
    lines = ["| model | " + " | ".join(t for _, _, t in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for name, values in rows]
    lines += ["", "WiSE-FT, every alpha (0 = pretrained, 1 = plain finetune):", "",
              "| alpha | " + " | ".join(t for _, _, t in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {r['alpha']:g} | " + " | ".join(f"{r[k]:.2f}" for _, k, _ in METRICS) + " |" for r in sweep]
    table = "\n".join(lines)
    print(table)
    (out / "report.md").write_text(table + "\n")

    panels = [("eval_mean_recall", "shapes val mean recall (target)"),
              ("eval_heldout_mean_recall", "Flickr8k test mean recall (held out)"),
              ("eval_zeroshot_top1", "CIFAR-10 zero-shot top-1 (held out)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for run, label in RUNS.items():
            points = history(out, run)
            ax.plot([e["step"] for e in points], [e[key] for e in points], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("finetuning step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forgetting_curves.png", dpi=100)
    print(f"wrote {out / 'report.md'}, {out / 'forgetting_curves.png'}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    finals = {run: json.loads((out / run / "eval_results.json").read_text()) for run in RUNS}
    for ax, (wise_key, key, title) in zip(axes, [("en_test_mean_recall", "eval_heldout_mean_recall",
                                                   "Flickr8k test mean recall"),
                                                  ("zeroshot_top1", "eval_zeroshot_top1", "CIFAR-10 zero-shot top-1")]):
        ax.plot([r[wise_key] for r in sweep], [r["en_val_mean_recall"] for r in sweep], marker="o", color="grey",
                label="WiSE-FT (pretrained - plain)")
        for r in sweep:
            ax.annotate(f"α={r['alpha']:g}", (r[wise_key], r["en_val_mean_recall"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="grey")
        for (run, label), marker in zip(RUNS.items(), "s^D"):
            ax.scatter([finals[run][key]], [finals[run]["eval_mean_recall"]], marker=marker, s=60, label=label,
                       zorder=3)
        ax.set_xlabel(f"{title} (held out)")
        ax.set_ylabel("shapes val mean recall (target)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trade_offs.png", dpi=100)
    if (out / "wise_ft" / "wise_ft_tradeoff.png").is_file():
        shutil.copyfile(out / "wise_ft" / "wise_ft_tradeoff.png", out / "wise_ft_tradeoff.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
