"""Image decoding (`load_image`: any PIL mode to RGB, reduced-size JPEG decode) and transforms per family:
open_clip / OpenAI / TinyCLIP resize the shorter side and center-crop, Chinese-CLIP squashes to a square; training
adds a mild random resized crop (scale 0.9-1, as open_clip), done on uint8 tensors.

Leaves out on purpose: RandAugment / AutoAugment and other heavy augmentation; CLIP finetunes rarely need them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from miniclip.config import ClipConfig

BICUBIC = T.InterpolationMode.BICUBIC


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, LA, CMYK, I;16, I, F...) -> RGB. Transparent pixels become white, not black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: rescale to 8 bits instead of letting PIL clip everything above 255 to white.
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.convert("F").point(lambda v: (v - lo) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageDecodeError(ValueError):
    """An image file that cannot be opened or decoded; the message names the file (callers add the entry).
    `reason` is what the decoder said."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open, decode and convert to RGB; an unreadable file raises ImageDecodeError naming it. With `draft_size`, a
    JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL
    `Image.draft`), never below `draft_size` on either side: several times cheaper than a full decode, and the
    following bicubic resize gives nearly the same pixels (tests/test_dataset.py bounds the difference)."""
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image = to_rgb(image)
            image.load()  # decode now, while the file is open (to_rgb returns RGB images unchanged, still lazy)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = f"{type(e).__name__}: {e}"
        raise ImageDecodeError(f"cannot read image {path}: {reason}", reason) from None
    return image


class TrainTransform:
    """Training transform: PIL image -> uint8 (3, H, W) -> random resized crop (scale 0.9-1, ratio 3/4-4/3, as
    open_clip) with antialiased bicubic resampling -> normalised float (3, S, S).

    The crop box is drawn as torchvision's RandomResizedCrop draws it (same RNG calls), so a seeded sample gets the
    box the PIL transform gives it; resampling uint8 tensors rather than PIL images gives pixels within 2 of 255
    levels of PIL's (tests/test_transforms.py) at about half the cost (bench/data_speed.py, ablation miniclip+pil)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift
        self.scale = (1 / (255 * torch.tensor(std))).view(3, 1, 1)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = F.pil_to_tensor(to_rgb(image))  # (3, H, W) uint8
        top, left, height, width = T.RandomResizedCrop.get_params(pixels, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
        pixels = F2.resized_crop(pixels, top, left, height, width, [self.size, self.size], interpolation=BICUBIC,
                                 antialias=True)  # (3, S, S) uint8
        return torch.addcmul(self.shift, pixels.float(), self.scale)  # (3, S, S)


def image_transform(config: ClipConfig, train: bool = False, image_size: int | None = None):
    """PIL image -> normalised float tensor (3, S, S). Evaluation resizes the PIL image, as open_clip does (equal
    outputs, tests/test_transforms.py); training is `TrainTransform`."""
    size = image_size or config.vision_cfg.image_size
    pre = config.preprocess_cfg
    if train:
        return TrainTransform(size, pre.mean, pre.std)
    if pre.resize_mode == "squash":
        geometry = [T.Resize((size, size), interpolation=BICUBIC)]
    else:
        geometry = [T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size)]
    return T.Compose([T.Lambda(to_rgb), *geometry, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def pil_train_transform(config: ClipConfig, image_size: int | None = None) -> T.Compose:
    """The training transform on PIL images (open_clip's way): the reference the tensor path is held to."""
    pre = config.preprocess_cfg
    crop = T.RandomResizedCrop(image_size or config.vision_cfg.image_size, scale=(0.9, 1.0), interpolation=BICUBIC)
    return T.Compose([T.Lambda(to_rgb), crop, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
