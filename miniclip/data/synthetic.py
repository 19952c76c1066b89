"""The built-in caption set of the default run: coloured shapes (circle, square, triangle, star, diamond) of two
sizes at five positions on noisy backgrounds, captioned in English and Chinese, written as the tutorial's JSON
files (`[{"image": "images/x.jpg", "caption": [...]}]`). Deterministic from a seed and cached on disk.

Leaves out on purpose: scenes with several objects and relations between them; the set exists to show that the
trainer learns, in minutes on a CPU, and to be a reproducible smoke test, not to be a benchmark.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from miniclip.files import cache_dir

VERSION = 1  # bump when the generator's output changes: cached sets with another version are regenerated
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

# (English, Chinese) names of each attribute value.
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "diamond": "菱形"}
COLORS = {"red": ("红色", (220, 30, 30)), "green": ("绿色", (30, 170, 50)), "blue": ("蓝色", (30, 70, 220)),
          "yellow": ("黄色", (235, 210, 20)), "purple": ("紫色", (140, 40, 180)), "orange": ("橙色", (250, 130, 0))}
POSITIONS = {"left": ("on the left", "左边", (0.25, 0.5)), "right": ("on the right", "右边", (0.75, 0.5)),
             "top": ("at the top", "上面", (0.5, 0.25)), "bottom": ("at the bottom", "下面", (0.5, 0.75)),
             "center": ("in the center", "中间", (0.5, 0.5))}
SIZES = {"small": ("小", 0.13), "big": ("大", 0.22)}  # radius as a fraction of the image side

# The embedded default run (`python train.py` with no data arguments) trains on this set with the settings of
# training/arguments.py: DEFAULT_RUN.
EN_TEMPLATES = ("a {size} {color} {shape} {pos}", "{pos_cap} there is a {size} {color} {shape}",
                "a photo of a {size} {color} {shape} {pos}", "a {color} {shape}, {size}, {pos}")
ZH_TEMPLATES = ("{pos}有一个{size}的{color}{shape}", "一个{size}{color}的{shape}在{pos}",
                "图片{pos}是一个{color}的{size}{shape}", "{pos}画着一个{size}的{color}{shape}")


@dataclass(frozen=True)
class SyntheticSpec:
    """What the generated set depends on; a cached set is reused only if its manifest records the same spec."""
    n_train: int = 3000
    n_val: int = 150
    n_test: int = 150
    image_size: int = 64
    captions_per_language: int = 2
    seed: int = 0
    version: int = VERSION

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test", "image_size", "captions_per_language"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticSpec.{name}={getattr(self, name)} must be >= 1 (every split needs images)")


@dataclass(frozen=True)
class SyntheticData:
    root: Path
    train_file: Path
    validation_file: Path
    test_file: Path


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (shape, color, position, size): 5 * 6 * 5 * 2 = 300."""
    return [(s, c, p, z) for s in SHAPES for c in COLORS for p in POSITIONS for z in SIZES]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":  # five points, inner radius 0.45 r
        radii, n = [r if k % 2 == 0 else 0.45 * r for k in range(10)], 10
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4}[shape]
        radii = [r * (1.25 if shape == "square" else 1.2)] * n
    start = angle + (np.pi / 4 if shape == "square" else -np.pi / 2)
    if shape == "diamond":  # a rhombus: tall and narrow, on its point
        return [(cx + 0.7 * r * np.cos(start + 2 * np.pi * k / 4), cy + 1.25 * r * np.sin(start + 2 * np.pi * k / 4))
                for k in range(4)]
    return [(cx + radii[k] * np.cos(start + 2 * np.pi * k / n), cy + radii[k] * np.sin(start + 2 * np.pi * k / n))
            for k in range(n)]


def render(shape: str, color: str, position: str, size: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """One image: a pale noisy background and the shape, jittered in place, size and (slightly) angle.
    Drawn at 4x and downsampled, for anti-aliased edges."""
    scale = 4
    side = image_size * scale
    background = rng.integers(170, 245, 3)
    pixels = np.clip(background + rng.normal(0, 12, (side // 8, side // 8, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize((side, side), Image.BILINEAR)
    fx, fy = POSITIONS[position][2]
    cx, cy = (fx + rng.uniform(-0.05, 0.05)) * side, (fy + rng.uniform(-0.05, 0.05)) * side
    r = SIZES[size][1] * side * rng.uniform(0.85, 1.15)
    fill = tuple(int(v) for v in np.clip(np.array(COLORS[color][1]) + rng.integers(-20, 21, 3), 0, 255))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.15, 0.15)), fill=fill)
    return image.resize((image_size, image_size), Image.LANCZOS)


def captions(shape: str, color: str, position: str, size: str, rng: np.random.Generator, per_language: int
             ) -> list[str]:
    """`per_language` English paraphrases, then as many Chinese ones, from distinct templates."""
    pos_en, pos_zh, _ = POSITIONS[position]
    en = {"shape": shape, "color": color, "size": size, "pos": pos_en, "pos_cap": pos_en[0].upper() + pos_en[1:]}
    zh = {"shape": SHAPES[shape], "color": COLORS[color][0], "size": SIZES[size][0], "pos": pos_zh}
    out = [re.sub(r"\ba (?=[aeiou])", "an ", EN_TEMPLATES[k].format(**en))  # "an orange ..."
           for k in rng.choice(len(EN_TEMPLATES), per_language, replace=False)]
    return out + [ZH_TEMPLATES[k].format(**zh) for k in rng.choice(len(ZH_TEMPLATES), per_language, replace=False)]


def _split_combos(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, list[tuple]]:
    """Training images draw combinations with replacement. Each held-out split draws distinct combinations (as many
    as there are, then again), so that a caption names one image of its gallery, or a few at most."""
    combos = all_combinations()
    out = {"train": [combos[k] for k in rng.integers(0, len(combos), spec.n_train)]}
    for split, n in (("val", spec.n_val), ("test", spec.n_test)):
        order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])[:n]
        out[split] = [combos[k] for k in order]
    return out


def _generate(spec: SyntheticSpec, root: Path) -> None:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    digest = hashlib.sha256()
    for split, combos in _split_combos(spec, rng).items():
        entries = []
        for i, combo in enumerate(combos):
            name = f"images/{split}_{i:05d}.jpg"
            render(*combo, rng, spec.image_size).save(root / name, quality=92)
            digest.update((root / name).read_bytes())
            entries.append({"image": name, "caption": captions(*combo, rng, spec.captions_per_language)})
        text = json.dumps(entries, ensure_ascii=False, indent=0) + "\n"
        (root / f"{split}.json").write_text(text, encoding="utf-8")
        digest.update(text.encode("utf-8"))
    manifest = {"spec": asdict(spec), "sha256": digest.hexdigest()}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _is_complete(root: Path, spec: SyntheticSpec) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("spec") != asdict(spec):
        return False
    counts = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    return all((root / f"{s}.json").is_file() and (root / "images" / f"{s}_{counts[s] - 1:05d}.jpg").is_file()
               for s in SPLITS if counts[s])


def ensure_synthetic(root: str | Path | None = None, spec: SyntheticSpec = SyntheticSpec()) -> SyntheticData:
    """The synthetic set under `root` (default `cache_dir("synthetic")`), generated if missing or made by another spec
    or version. Generation writes a temporary sibling folder and renames it into place, so an interrupted run
    never leaves a half-written set, and concurrent processes (one per GPU) end up with the same files."""
    root = Path(root) if root is not None else cache_dir("synthetic")
    if not _is_complete(root, spec):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            _generate(spec, tmp / "set")
            if not _is_complete(root, spec):  # another process may have finished first
                if root.exists():
                    stale = root.with_name(f".{root.name}-stale-{os.getpid()}")
                    os.replace(root, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(tmp / "set", root)
        except OSError:
            if not _is_complete(root, spec):  # lost a rename race to an identical set: fine; else a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SyntheticData(root, root / "train.json", root / "val.json", root / "test.json")


def manifest_hash(root: str | Path) -> str:
    """The sha256 over every image and JSON file the generator wrote, as recorded in the manifest."""
    return json.loads((Path(root) / MANIFEST).read_text())["sha256"]
