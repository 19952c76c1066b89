"""Zero-shot classification: prompt templates (CLIP's 80 ImageNet prompts; Chinese-CLIP's Chinese ones), the
template-ensembled classifier built from class names, and an image-folder reader (subfolder = class).

Leaves out on purpose: per-dataset template sets and class-name lists other than what the user passes in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from miniclip.config import check_literal
from miniclip.evaluation.encode import Encoder
from miniclip.files import read_mapping_file
from miniclip.evaluation.metrics import zeroshot_metrics

logger = logging.getLogger(__name__)

TemplateSet = Literal["auto", "english", "chinese", "simple"]

# The 80 prompt templates CLIP used for ImageNet (Radford et al. 2021, released with the paper's notebooks).
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# The Chinese ImageNet templates Chinese-CLIP evaluates with (Yang et al. 2022; translated from the list above).
CHINESE_IMAGENET_TEMPLATES = (
    "{}的照片。", "质量差的{}的照片。", "许多{}的照片。", "{}的雕塑。", "难以看到{}的照片。", "{}的低分辨率照片。",
    "{}的渲染。", "涂鸦{}。", "{}的糟糕照片。", "{}的裁剪照片。", "{}的纹身。", "{}的刺绣照片。",
    "很难看到{}的照片。", "{}的明亮照片。", "一张干净的{}的照片。", "一张包含{}的照片。", "{}的深色照片。",
    "{}的手绘画。", "我的{}的照片。", "不自然的{}的照片。", "一张酷的{}的照片。", "{}的特写照片。",
    "{}的黑白照片。", "一幅{}的画。", "一幅{}的绘画。", "一张{}的像素照片。", "{}的雕像。", "一张{}的明亮照片。",
    "{}的裁剪照片。", "人造的{}的照片。", "一张关于{}的照片。", "损坏的{}的jpeg照片。", "{}的模糊照片。",
    "{}的相片。", "一张{}的好照片。", "{}的渲染照。", "视频游戏中的{}。", "一张{}的照片。", "{}的涂鸦。",
    "{}的近距离照片。", "{}的折纸。", "{}在视频游戏中。", "{}的草图。", "{}的涂鸦照。", "{}的折纸形状。",
    "低分辨率的{}的照片。", "玩具{}。", "{}的副本。", "{}的干净的照片。", "一张大{}的照片。", "{}的重现。",
    "一张漂亮的{}的照片。", "一张奇怪的{}的照片。", "模糊的{}的照片。", "卡通{}。", "{}的艺术作品。", "{}的素描。",
    "刺绣{}。", "{}的像素照。", "{}的拍照。", "{}的损坏的照片。", "高质量的{}的照片。", "毛绒玩具{}。",
    "漂亮的{}的照片。", "小{}的照片。", "照片是奇怪的{}。", "漫画{}。", "{}的艺术照。", "{}的图形。", "大{}的照片。",
    "黑白的{}的照片。", "{}毛绒玩具。", "一张{}的深色照片。", "{}的摄影图。", "{}的涂鸦照。", "玩具形状的{}。",
    "拍了{}的照片。", "酷酷的{}的照片。", "照片里的小{}。", "{}的刺青。",
)

SIMPLE_TEMPLATES = ("a photo of a {}.",)


def get_templates(which: TemplateSet = "auto", config=None) -> tuple[str, ...]:
    """A template set by name; "auto" picks Chinese for a BERT (Chinese-CLIP) text tower, else English."""
    check_literal(which, TemplateSet, "templates")
    if which == "auto":
        if config is None:
            raise ValueError('templates="auto" needs the model config to choose English or Chinese prompts')
        which = "chinese" if config.text_cfg.tower == "bert" else "english"
    return {"english": OPENAI_IMAGENET_TEMPLATES, "chinese": CHINESE_IMAGENET_TEMPLATES,
            "simple": SIMPLE_TEMPLATES}[which]


def zeroshot_classifier(encoder: Encoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """One embedding per class (C, D): every template filled with the class name, the normalised text embeddings
    averaged and renormalised (CLIP's prompt ensembling, Radford et al. 2021, sec. 3.1.4)."""
    if not classnames:
        raise ValueError("zeroshot_classifier needs at least one class name")
    if not templates or not all("{}" in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {list(templates)[:3]}")
    texts = [t.format(name) for name in classnames for t in templates]
    embeds = encoder.texts(texts)  # (C*T, D) normalised
    embeds = embeds.view(len(classnames), len(templates), -1).mean(1)  # (C, D)
    return F.normalize(embeds, dim=-1)


@dataclass
class ImageFolder:
    """Image files with their class index; `classnames` are the prompts' names (folder names unless mapped)."""
    paths: list[Path]
    labels: list[int]
    folders: list[str]
    classnames: list[str]
    ignored: int  # files that are not images by their extension


def _image_extensions() -> set[str]:
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def read_class_map(path: str | Path | None, folders: Sequence[str]) -> list[str]:
    """Class names for the folders: from a JSON object {folder: name} (every folder needed), else folder names with
    underscores as spaces."""
    if path is None:
        return [f.replace("_", " ") for f in folders]
    path = Path(path)
    mapping = read_mapping_file(path, "class-name map")
    if not all(isinstance(v, str) and v.strip() for v in mapping.values()):
        raise ValueError(f'class-name map {path} must be a JSON object {{"folder": "class name", ...}}')
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ValueError(f"class-name map {path} has no entry for folder(s) {missing[:10]}; add them, e.g. "
                         f'{{"{missing[0]}": "..."}}')
    return [mapping[f] for f in folders]


def read_image_folder(root: str | Path, class_map: str | Path | None = None) -> ImageFolder:
    """`root/<class>/<image>` -> paths and labels, classes in sorted folder order. Files that are not images (by
    extension) are ignored and counted; an empty class folder is an error naming it (its class could never be
    scored). Corrupt image files are found at decode time (see `evaluation.encode_images(..., skip_unreadable=True)`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"zero-shot image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    extensions = _image_extensions()
    paths, labels, ignored = [], [], 0
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in extensions]
        ignored += len(files) - len(images)
        if not images:
            raise ValueError(f"class folder {root / folder} has no image files; remove it or add images")
        paths.extend(images)
        labels.extend([label] * len(images))
    if ignored:
        logger.warning("%s: ignored %d file(s) that are not images", root, ignored)
    return ImageFolder(paths, labels, folders, read_class_map(class_map, folders), ignored)


def limit_per_class(folder: ImageFolder, per_class: int | None) -> ImageFolder:
    """The first `per_class` images of each class (all when None): a balanced subset for quick evaluations."""
    if per_class is None:
        return folder
    if per_class <= 0:
        raise ValueError(f"per_class={per_class} must be a positive number of images")
    seen: dict[int, int] = {}
    keep = []
    for i, label in enumerate(folder.labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= per_class:
            keep.append(i)
    return ImageFolder([folder.paths[i] for i in keep], [folder.labels[i] for i in keep], folder.folders,
                       folder.classnames, folder.ignored)


def evaluate_zeroshot(encoder: Encoder, folder: ImageFolder, templates: Sequence[str]) -> dict[str, float]:
    """Zero-shot accuracy on an image folder: the classifier from the class names and templates, then every
    readable image scored against it. Keys: zeroshot_top1, zeroshot_top5 (with >= 5 classes),
    zeroshot_mean_per_class (percent); unreadable images are skipped (logged)."""
    classifier = zeroshot_classifier(encoder, folder.classnames, templates)  # (C, D)
    image_embeds, kept = encoder.image_files(folder.paths, skip_unreadable=True)  # (N, D)
    return zeroshot_metrics(image_embeds, classifier, torch.tensor(folder.labels)[kept])
