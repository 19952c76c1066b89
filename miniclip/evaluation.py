"""Encoding images and captions in batches (eval mode, no autograd) and scoring retrieval on a caption file.

Used by `ClipTrainer.evaluate` and by test.py. Leaves out on purpose: multi-process gathering (evaluation runs on
one process; the trainer calls it on the main process) and data-loader workers (decode is done in this process,
with reduced-size JPEG decoding, which is the cheap part next to the image tower on CPU).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .captions import CaptionRecord
from .metrics import retrieval_metrics
from .transforms import load_image

logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An image file that PIL cannot open or decode; the message names the file."""


def open_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """`transforms.load_image` (RGB; JPEGs decoded at a reduced scale that keeps both sides >= min_size), with an
    unreadable file reported as `UnreadableImageError` naming it."""
    try:
        return load_image(path, draft_size=min_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {e}") from None


def model_device_dtype(model: torch.nn.Module, device=None, dtype=None) -> tuple[torch.device, torch.dtype | None]:
    """The device to run on (given, else the model's); `dtype` is an autocast dtype (e.g. torch.bfloat16) or None."""
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device), dtype


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the duration, then back to whatever the model was (the trainer calls us mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _image_size(transform) -> int | None:
    """The output size of a torchvision transform pipeline, to pick a JPEG draft scale; None when unknown."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return min(size)
    return None


def encode_images(model, images: Sequence[str | Path | Image.Image], transform: Callable, batch_size: int = 64,
                  device=None, dtype=None, progress: bool = True) -> torch.Tensor:
    """Paths or PIL images -> L2-normalised image embeddings (N, D) float32 on the CPU.

    An unreadable file raises UnreadableImageError naming it; `encode_image_files` skips such files instead."""
    embeds, _ = encode_image_files(model, images, transform, batch_size, device, dtype, progress)
    return embeds


def _load(image, min_size: int | None, transform: Callable, skip_unreadable: bool) -> torch.Tensor | None:
    if isinstance(image, Image.Image):
        return transform(image)
    try:
        return transform(open_image(image, min_size))
    except UnreadableImageError as e:
        if not skip_unreadable:
            raise
        logger.warning("skipping: %s", e)
        return None


@torch.inference_mode()
def encode_image_files(model, images: Sequence[str | Path | Image.Image], transform: Callable, batch_size: int = 64,
                       device=None, dtype=None, progress: bool = True,
                       skip_unreadable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `encode_images`, and also returns the indices of the images encoded (N_kept,): with
    skip_unreadable=True, files PIL cannot decode are left out (each logged, and the count at the end)."""
    device, dtype = model_device_dtype(model, device, dtype)
    min_size = _image_size(transform)
    chunks, kept = [], []
    with _eval_mode(model):
        for start in tqdm(range(0, len(images), batch_size), desc="images", unit="batch", disable=not progress):
            loaded = [(start + i, _load(im, min_size, transform, skip_unreadable))
                      for i, im in enumerate(images[start:start + batch_size])]
            loaded = [(i, x) for i, x in loaded if x is not None]
            if not loaded:
                continue
            kept.extend(i for i, _ in loaded)
            pixel_values = torch.stack([x for _, x in loaded])  # (B, 3, S, S)
            with _autocast(device, dtype):
                embeds = model.encode_image(pixel_values.to(device), normalize=False)  # (B, D)
            chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
    if len(kept) < len(images):
        logger.warning("skipped %d unreadable image(s) of %d", len(images) - len(kept), len(images))
    if not chunks:
        raise ValueError(f"no image could be encoded ({len(images)} given, all unreadable or none)")
    return torch.cat(chunks), torch.tensor(kept, dtype=torch.long)


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], tokenizer: Callable, batch_size: int = 256, device=None, dtype=None,
                 progress: bool = True) -> torch.Tensor:
    """Strings -> L2-normalised text embeddings (N, D) float32 on the CPU."""
    device, dtype = model_device_dtype(model, device, dtype)
    texts = list(texts)
    chunks = []
    with _eval_mode(model):
        for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", disable=not progress):
            tokens = tokenizer(texts[start:start + batch_size])
            input_ids = tokens["input_ids"]  # (B, L)
            attention_mask = tokens.get("attention_mask")
            if attention_mask is None:
                # Causal CLIP tower: columns after the batch's last EOT (the highest id) are inert padding; trim them.
                length = int(input_ids.argmax(1).max()) + 1
                input_ids = input_ids[:, :length]
            else:
                length = int(attention_mask.sum(1).max())
                input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length].to(device)
            with _autocast(device, dtype):
                embeds = model.encode_text(input_ids.to(device), attention_mask, normalize=False)  # (B, D)
            chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
    if not chunks:
        raise ValueError("encode_texts got no texts")
    return torch.cat(chunks)


def flatten_captions(records: Sequence[CaptionRecord]) -> tuple[list[str], torch.Tensor]:
    """All captions in file order, and the index of each caption's image (N_txt,)."""
    texts, text_to_image = [], []
    for index, record in enumerate(records):
        texts.extend(record.captions)
        text_to_image.extend([index] * len(record.captions))
    return texts, torch.tensor(text_to_image, dtype=torch.long)


def evaluate_retrieval(model, records: Sequence[CaptionRecord], tokenizer, transform, batch_size: int = 64,
                       device=None, dtype=None, progress: bool = True) -> dict[str, float]:
    """Retrieval both ways with every caption of every record (see metrics.retrieval_metrics for the definitions).

    Keys: t2i_R@1/5/10, i2t_R@1/5/10, t2i_median_rank, i2t_median_rank, mean_recall (recalls in percent)."""
    if not records:
        raise ValueError("evaluate_retrieval got no records; read them with captions.read_caption_file")
    texts, text_to_image = flatten_captions(records)
    image_embeds = encode_images(model, [r.image for r in records], transform, batch_size, device, dtype, progress)
    text_embeds = encode_texts(model, texts, tokenizer, max(batch_size, 256), device, dtype, progress)
    return retrieval_metrics(image_embeds, text_embeds, text_to_image)
