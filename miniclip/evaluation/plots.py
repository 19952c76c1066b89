"""Pictures people would rather see than read, saved as PNG with matplotlib's Agg backend: the similarity heatmap
of the single-image check, a retrieval grid (query text -> top-k images, the correct one framed), and training
curves (loss / recall per step) the trainer can reuse.

Leaves out on purpose: interactive display and embedding projections (t-SNE / UMAP).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from miniclip.evaluation.metrics import is_recall  # noqa: E402
from miniclip.files import atomic_write  # noqa: E402
from miniclip.transforms import to_rgb  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Write atomically (files.atomic_write) as a PNG, so a reader never sees half of one; closes the figure."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def _thumbnail(image: str | Path | Image.Image, size: int = 160) -> Image.Image:
    image = Image.open(image) if not isinstance(image, Image.Image) else image
    image.draft("RGB", (size, size))  # cheap reduced JPEG decode; a no-op for other formats
    image = to_rgb(image)
    image.thumbnail((size, size))
    return image


def similarity_heatmap(image: str | Path | Image.Image, texts: Sequence[str], similarities: Sequence[float],
                       probabilities: Sequence[float], path: str | Path) -> Path:
    """The image beside a one-column heatmap of cosine similarity per text, annotated with cos and softmax prob."""
    fig, (ax_image, ax_map) = plt.subplots(1, 2, figsize=(8, max(2.5, 0.45 * len(texts) + 1)),
                                           gridspec_kw={"width_ratios": [1, 1.2]})
    ax_image.imshow(_thumbnail(image, 256))
    ax_image.axis("off")
    values = [[float(s)] for s in similarities]  # (T, 1)
    ax_map.imshow(values, cmap="viridis", aspect="auto")
    ax_map.set_yticks(range(len(texts)), [textwrap.shorten(t, 40) for t in texts])
    ax_map.set_xticks([])
    for row, (s, p) in enumerate(zip(similarities, probabilities)):
        ax_map.text(0, row, f"cos {float(s):.3f}\np {float(p):.1%}", ha="center", va="center", color="white",
                    fontsize=9)
    ax_map.set_title("cosine similarity (softmax probability)")
    return save_figure(fig, path)


def retrieval_grid(queries: Sequence[str], top_images: Sequence[Sequence[str | Path]],
                   correct: Sequence[Sequence[bool]], path: str | Path, thumb: int = 120) -> Path:
    """One row per query text: its top-k images, best first, the correct ones framed in green (others grey)."""
    rows, k = len(queries), max(len(r) for r in top_images)
    fig, axes = plt.subplots(rows, k, figsize=(1.6 * k + 2.5, 1.7 * rows), squeeze=False)
    for r, (query, images, hits) in enumerate(zip(queries, top_images, correct)):
        for c in range(k):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            ax.imshow(_thumbnail(images[c], thumb))
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hits[c] else "lightgrey")
                spine.set_linewidth(5 if hits[c] else 1)
            ax.set_title(f"#{c + 1}" + (" ✓" if hits[c] else ""), fontsize=8)
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(query, 28)[:4]), rotation=0, ha="right", va="center",
                              fontsize=8)
    fig.suptitle("text -> image retrieval (correct image framed)")
    return save_figure(fig, path)


def plot_curves(history: Sequence[dict], path: str | Path, keys: Sequence[str] | None = None,
                x_key: str = "step") -> Path:
    """Curves from a log history (e.g. `trainer.state.log_history`: a list of dicts with "step" and values): one
    panel per key; by default `loss`, `eval_loss` and every recall / `mean_recall` key present."""
    if keys is None:
        present = {k for entry in history for k in entry}
        keys = [k for k in ("loss", "eval_loss") if k in present]
        keys += sorted(k for k in present if is_recall(k))
    keys = [k for k in keys if any(k in entry for entry in history)]
    if not keys:
        raise ValueError(f"no curve to plot: none of the keys is in the history (keys there: "
                         f"{sorted({k for entry in history for k in entry})[:20]})")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(entry.get(x_key, i), entry[key]) for i, entry in enumerate(history) if key in entry]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def wise_ft_tradeoff(rows: Sequence[dict], target_key: str, heldout_keys: Sequence[str], path: str | Path) -> Path:
    """WiSE-FT's trade-off (Wortsman et al. 2022, Fig. 1): one panel per held-out metric (x) against the target
    metric (y), one point per alpha joined in alpha order and labelled with it. `rows` hold "alpha" and the keys."""
    fig, axes = plt.subplots(1, len(heldout_keys), figsize=(4.2 * len(heldout_keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], heldout_keys):
        xs, ys = [r[key] for r in rows], [r[target_key] for r in rows]
        ax.plot(xs, ys, marker="o")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{key} (what it knew)")
        ax.set_ylabel(f"{target_key} (target)")
        ax.grid(alpha=0.3)
    fig.suptitle("WiSE-FT: interpolating zero-shot (α=0) and finetuned (α=1) weights")
    return save_figure(fig, path)
