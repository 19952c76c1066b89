"""Image decoding (`load_image`: any PIL mode to RGB, reduced-size JPEG decode) and transforms per family:
open_clip / OpenAI / TinyCLIP resize the shorter side and center-crop, Chinese-CLIP squashes to a square; training
adds a mild random resized crop (scale 0.9-1, as open_clip).

Leaves out on purpose: RandAugment / AutoAugment and other heavy augmentation; CLIP finetunes rarely need them.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision import transforms as T

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


def image_transform(config: ClipConfig, train: bool = False, image_size: int | None = None) -> T.Compose:
    """PIL image -> normalised float tensor (3, S, S)."""
    size = image_size or config.vision_cfg.image_size
    pre = config.preprocess_cfg
    if train:
        geometry = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)]
    elif pre.resize_mode == "squash":
        geometry = [T.Resize((size, size), interpolation=BICUBIC)]
    else:
        geometry = [T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size)]
    return T.Compose([T.Lambda(to_rgb), *geometry, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
