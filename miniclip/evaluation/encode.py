"""Encoding images and captions in batches (eval mode, no autograd) and scoring retrieval on a caption file.

`Encoder` holds how to encode (model, transform, tokenizer, device, precision, batch sizes) once; evaluation,
zero-shot, the demo and test.py all take one. Leaves out on purpose: multi-process gathering (evaluation runs on
one process; the trainer calls it on the main process) and data-loader workers (decode is done in this process,
which is the cheap part next to the image tower on CPU).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from miniclip.data.captions import CaptionRecord
from miniclip.evaluation.metrics import retrieval_metrics
from miniclip.tokenizer import trim_tokens
from miniclip.transforms import ImageDecodeError, load_image

logger = logging.getLogger(__name__)
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


@dataclass
class Encoder:
    """How to encode: a model with its image transform and tokenizer, where (device: default the model's) and at
    what precision (dtype: an autocast dtype such as torch.bfloat16, or None for fp32), in what batches.
    Embeddings come back L2-normalised, float32, on the CPU."""
    model: torch.nn.Module
    transform: Callable | None = None
    tokenizer: Callable | None = None
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    image_batch_size: int = 64
    text_batch_size: int = 256
    progress: bool = True
    draft_size: int | None = None  # decode JPEGs at a reduced scale keeping both sides >= this (faster, not exact)

    def __post_init__(self):
        self.device = torch.device(self.device) if self.device is not None else next(self.model.parameters()).device

    def images(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Paths or PIL images -> (N, D). An unreadable file raises ImageDecodeError naming it."""
        return self.image_files(images, skip_unreadable=False)[0]

    @torch.inference_mode()
    def image_files(self, images: Sequence[str | Path | Image.Image],
                    skip_unreadable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_kept, D) embeddings and the indices of the images encoded (N_kept,): with skip_unreadable, files PIL
        cannot decode are left out (each logged, and the count at the end)."""
        chunks, kept = [], []
        with _eval_mode(self.model):
            for start in tqdm(range(0, len(images), self.image_batch_size), desc="images", unit="batch",
                              disable=not self.progress):
                loaded = [(start + i, self._pixels(im, skip_unreadable))
                          for i, im in enumerate(images[start:start + self.image_batch_size])]
                loaded = [(i, x) for i, x in loaded if x is not None]
                if not loaded:
                    continue
                kept.extend(i for i, _ in loaded)
                pixel_values = torch.stack([x for _, x in loaded])  # (B, 3, S, S)
                with _autocast(self.device, self.dtype):
                    embeds = self.model.encode_image(pixel_values.to(self.device), normalize=False)  # (B, D)
                chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
        if len(kept) < len(images):
            logger.warning("skipped %d unreadable image(s) of %d", len(images) - len(kept), len(images))
        if not chunks:
            raise ValueError(f"no image could be encoded ({len(images)} given, all unreadable or none)")
        return torch.cat(chunks), torch.tensor(kept, dtype=torch.long)

    def _pixels(self, image, skip_unreadable: bool) -> torch.Tensor | None:
        if isinstance(image, Image.Image):
            return self.transform(image)
        try:
            return self.transform(load_image(image, self.draft_size))
        except ImageDecodeError as e:
            if not skip_unreadable:
                raise
            logger.warning("skipping: %s", e)
            return None

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> (N, D). Each batch is trimmed to its longest caption (tokenizer.trim_tokens)."""
        texts = list(texts)
        chunks = []
        with _eval_mode(self.model):
            for start in tqdm(range(0, len(texts), self.text_batch_size), desc="texts", unit="batch",
                              disable=not self.progress):
                tokens = trim_tokens(self.tokenizer(texts[start:start + self.text_batch_size]))
                with _autocast(self.device, self.dtype):
                    embeds = self.model.encode_text(tokens["input_ids"].to(self.device),
                                                    tokens["attention_mask"].to(self.device), normalize=False)
                chunks.append(F.normalize(embeds.float(), dim=-1).cpu())  # (B, D)
        if not chunks:
            raise ValueError("Encoder.texts got no texts")
        return torch.cat(chunks)


def flatten_captions(records: Sequence[CaptionRecord]) -> tuple[list[str], torch.Tensor]:
    """All captions in file order, and the index of each caption's image (N_txt,)."""
    texts, text_to_image = [], []
    for index, record in enumerate(records):
        texts.extend(record.captions)
        text_to_image.extend([index] * len(record.captions))
    return texts, torch.tensor(text_to_image, dtype=torch.long)


def evaluate_retrieval(encoder: Encoder, records: Sequence[CaptionRecord]) -> dict[str, float]:
    """Retrieval both ways with every caption of every record (see metrics.retrieval_metrics for the definitions).

    Keys: t2i_R@1/5/10, i2t_R@1/5/10, t2i_median_rank, i2t_median_rank, mean_recall (recalls in percent)."""
    if not records:
        raise ValueError("evaluate_retrieval got no records; read them with data.captions.read_caption_file")
    texts, text_to_image = flatten_captions(records)
    image_embeds = encoder.images([r.image for r in records])
    text_embeds = encoder.texts(texts)
    return retrieval_metrics(image_embeds, text_embeds, text_to_image)
