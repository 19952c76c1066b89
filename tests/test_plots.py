"""plots.py writes real PNGs of the expected size and refuses to plot nothing."""
import numpy as np
import pytest
from PIL import Image

from miniclip.evaluation.plots import plot_curves, retrieval_grid, similarity_heatmap


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_heatmap_and_grid(tmp_path, images):
    w, h = png_size(similarity_heatmap(images[0], ["a dog", "a cat"], [0.3, 0.2], [0.7, 0.3], tmp_path / "h.png"))
    assert w > h > 100
    path = retrieval_grid(["q one", "q two"], [images[:3], images[1:4]], [[False, True, False], [False] * 3],
                          tmp_path / "sub" / "grid.png")
    w, h = png_size(path)
    assert w > h > 150  # 2 rows x 3 thumbnails
    assert not list(tmp_path.glob(".*png"))  # no temp files left


def test_curves(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_t2i_R@1": 5.0, "eval_mean_recall": 4.0},
               {"step": 3, "loss": 1.0, "epoch": 1}]
    w, h = png_size(plot_curves(history, tmp_path / "c.png"))
    assert w > 2.5 * h  # three panels: loss, eval_mean_recall, eval_t2i_R@1
    with pytest.raises(ValueError, match="no curve to plot"):
        plot_curves([{"step": 1, "epoch": 1}], tmp_path / "none.png")
