"""The distillation example's summary: test recall of the teacher and of each student variant (mean +- std over
seeds) as distill.md and a bar chart distill.png.

    python examples/distill_report.py STUDENTS_DIR TEACHER_DIR OUTPUT_DIR    # what distill_flickr8k.sh runs
"""
import csv
import json
import sys
from pathlib import Path

from miniclip.apps.ablate import DONE
from miniclip.apps.ablation_report import aggregate, read_run
from miniclip.files import atomic_write

METRICS = ["test_t2i_R@1", "test_t2i_R@5", "test_t2i_R@10", "test_i2t_R@1", "test_i2t_R@5", "test_i2t_R@10",
           "test_mean_recall"]


def main(students: Path, teacher: Path, out: Path) -> None:
    with open(students / "ablation_runs.csv", newline="") as f:  # the grid's order: variants as declared
        records = [read_run(Path(row["dir"])) for row in csv.DictReader(f) if (Path(row["dir"]) / DONE).is_file()]
    table = aggregate(records, METRICS + ["train_runtime"])
    teacher_metrics = json.loads((teacher / "all_results.json").read_text())
    header = "| model | seeds | " + " | ".join(m.removeprefix("test_") for m in METRICS) + " | train s |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    lines.append("| teacher (4+4 layers) | 1 | " + " | ".join(f"{teacher_metrics[m]:.2f}" for m in METRICS)
                 + f" | {teacher_metrics['train_runtime']:.0f} |")
    for row in table:
        cells = [f"{row[m][0]:.2f} +- {row[m][1]:.2f}" if m in row else "" for m in METRICS]
        lines.append(f"| {row['variant']} (2+2 layers) | {len(row['seeds'])} | " + " | ".join(cells)
                     + f" | {row['train_runtime'][0]:.0f} |")
    text = "Flickr8k test retrieval (1000 images, 5000 captions), recall in %; mean +- std over seeds\n\n" + \
        "\n".join(lines) + "\n"
    (out / "distill.md").write_text(text)
    print(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["teacher"] + [row["variant"] for row in table]
    means = [teacher_metrics["test_mean_recall"]] + [row["test_mean_recall"][0] for row in table]
    stds = [0.0] + [row["test_mean_recall"][1] for row in table]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, means, yerr=stds, capsize=5, color=["0.5"] + [f"C{i}" for i in range(len(table))])
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(i, m + s, f"{m:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("test mean recall (%)")
    ax.set_title("Flickr8k: 2-layer students at the same budget (3 seeds, +- std) and the 4-layer teacher")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "distill.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    print(f"wrote {out / 'distill.md'} and {out / 'distill.png'}")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
