"""Training data: caption records (captions.py) -> a `datasets.Dataset` decoded on the fly (`with_transform`) into
`{"pixel_values", "caption"}` items, and `ClipCollator`, which stacks images and tokenizes captions trimmed to the
batch's longest. Leaves out on purpose: caption augmentation, and shards (streamed by data/streaming.py).

Caption choice: mode "random" gives each image one caption per epoch, picked from (seed, epoch, index) alone, so a
resumed run, any number of dataloader workers and any process see the same pairs; mode "all" makes every caption
its own pair. The epoch lives in shared memory, so persistent workers see `set_epoch` too (see `set_epoch`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from miniclip.data.captions import BadSamplePolicy, CaptionRecord, read_caption_file
from miniclip.config import ClipConfig, check_literal
from miniclip.tokenizer import trim_tokens
from miniclip.transforms import ImageDecodeError, image_transform, load_image

logger = logging.getLogger(__name__)

CaptionMode = Literal["random", "all"]


def caption_choice(seed: int, epoch: int, index: int, n_captions: int) -> int:
    """Which of an image's captions is used in this epoch: a pure function of (seed, epoch, index), so it does not
    depend on worker processes, sampling order, or where a resumed run restarted."""
    if n_captions == 1:
        return 0
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    return int(state % n_captions)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of one sample's random augmentation in one epoch: a pure function, like `caption_choice`."""
    return int(np.random.SeedSequence([seed, epoch, index, 1]).generate_state(1)[0])


class _Decode:
    """The `with_transform` function: a batch of rows (image path, captions, index) -> pixel_values and caption."""

    def __init__(self, transform: Callable, caption_mode: str, seed: int, epoch: torch.Tensor, draft_size,
                 teacher_transform: Callable | None = None):
        self.transform, self.caption_mode, self.seed, self.epoch, self.draft_size = (
            transform, caption_mode, seed, epoch, draft_size)
        self.teacher_transform = teacher_transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values, teacher_pixel_values, captions = [], [], []
        for image, row_captions, index, caption_index in zip(batch["image"], batch["captions"], batch["index"],
                                                             batch["caption_index"]):
            if self.caption_mode == "random":
                caption_index = caption_choice(self.seed, int(self.epoch), index, len(row_captions))
            try:
                decoded = load_image(image, self.draft_size)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"entry {index} (image {image}): cannot decode the image: {e.reason}. Fix: "
                                       "replace or remove the file, or use the bad-sample policy 'skip' to drop "
                                       "such samples.", e.reason) from None
            # Random augmentation drawn from (seed, epoch, index) too, not from the global RNG stream: the
            # dataloader prefetches batches, so a checkpoint's saved RNG state is ahead of the batch that follows
            # it, and a resumed run would otherwise crop differently.
            # Only the CPU generator (torchvision's transforms draw from it): torch.manual_seed would also reseed
            # every CUDA generator, which fork_rng(devices=[]) does not restore, and costs ~160 us per sample.
            seed = augment_seed(self.seed, int(self.epoch), index)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                pixel_values.append(self.transform(decoded))  # (3, S, S)
                if self.teacher_transform is not None:  # the same draws: the teacher sees the same crop
                    torch.default_generator.manual_seed(seed)
                    teacher_pixel_values.append(self.teacher_transform(decoded))  # (3, S_t, S_t)
            captions.append(row_captions[caption_index])
        out = {"pixel_values": pixel_values, "caption": captions}
        if self.teacher_transform is not None:
            out["teacher_pixel_values"] = teacher_pixel_values
        return out


class ClipDataset(torch.utils.data.Dataset):
    """Image-caption pairs decoded lazily. Item: {"pixel_values": (3, S, S) float, "caption": str}.

    Bad images are found when first decoded. on_bad="error" raises `ImageDecodeError` naming the file and the entry;
    on_bad="skip" logs and counts the sample and serves the next entry (index + 1, + 2, ... wrapping) whose image
    decodes instead. Substituting rather than dropping keeps every batch full, which contrastive losses with
    features gathered across processes need (equal batch sizes), keeps len() and the sampler's order unchanged, and
    is deterministic, so a resumed run sees the same batches. The price: the substitute appears twice in its epoch.
    teacher_transform (distillation with a teacher of another image size / preprocessing): items also hold
    "teacher_pixel_values", the same decoded image through the teacher's transform with the same random draws.
    """

    def __init__(self, records: list[CaptionRecord], transform: Callable, caption_mode: CaptionMode = "random",
                 seed: int = 0, on_bad: BadSamplePolicy = "error", draft_size: int | None = None,
                 teacher_transform: Callable | None = None):
        check_literal(caption_mode, CaptionMode, "caption_mode")
        check_literal(on_bad, BadSamplePolicy, "on_bad")
        if not records:
            raise ValueError("no caption records: the data set is empty")
        self.caption_mode, self.on_bad = caption_mode, on_bad
        rows = []
        for index, record in enumerate(records):
            pairs = range(len(record.captions)) if caption_mode == "all" else [-1]
            rows += [{"image": str(record.image), "captions": list(record.captions), "index": index,
                      "caption_index": j} for j in pairs]
        # One int64 in shared memory: forked or spawned dataloader workers (persistent ones too) read the value the
        # main process last wrote, so `set_epoch` reaches them without restarting them.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        decode = _Decode(transform, caption_mode, seed, self._epoch, draft_size, teacher_transform)
        self.table = datasets.Dataset.from_list(rows).with_transform(decode)
        self.skipped: set[int] = set()  # this process's bad rows (each dataloader worker counts its own)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoaderShard at each `iter()` in single-process runs, and by `EpochCallback`
        (always: with several processes, accelerate 1.15 forwards set_epoch to the sampler only)."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.table)):
            row = (index + offset) % len(self.table)
            if row in self.skipped:
                continue
            try:
                return self.table[row]
            except ImageDecodeError as e:
                if self.on_bad == "error":
                    raise
                self.skipped.add(row)
                logger.warning("skipping bad sample (%d skipped so far in this process): %s", len(self.skipped),
                               str(e).split(". Fix:")[0])
        raise ImageDecodeError(f"every one of the {len(self.table)} samples has an image that cannot be decoded")


def build_dataset(records: list[CaptionRecord], config: ClipConfig, train: bool = True,
                  caption_mode: CaptionMode = "random", seed: int = 0, max_samples: int | None = None,
                  on_bad: BadSamplePolicy = "error", image_size: int | None = None,
                  draft: bool = True, teacher_config: ClipConfig | None = None) -> ClipDataset:
    """The dataset for a model config: its family's transform (train: random resized crop), the first
    `max_samples` images (all their captions in mode "all"), JPEG draft decoding unless `draft=False`.
    teacher_config: also the teacher's pixel values, when its image size or preprocessing differs."""
    if max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"max_samples={max_samples} must be a positive number of images (or None for all)")
        records = records[:max_samples]
    size = image_size or config.vision_cfg.image_size
    transform = image_transform(config, train=train, image_size=size)
    teacher_transform = None
    if teacher_config is not None and needs_own_pixels(config, teacher_config, size):
        teacher_transform = image_transform(teacher_config, train=train)
        size = max(size, teacher_config.vision_cfg.image_size)  # decode large enough for both
    return ClipDataset(records, transform, caption_mode=caption_mode, seed=seed, on_bad=on_bad,
                       draft_size=size if draft else None, teacher_transform=teacher_transform)


def needs_own_pixels(config: ClipConfig, teacher_config: ClipConfig, image_size: int | None = None) -> bool:
    """Whether a teacher needs its own pixel values: another image size or preprocessing than the student's."""
    return ((image_size or config.vision_cfg.image_size) != teacher_config.vision_cfg.image_size
            or config.preprocess_cfg != teacher_config.preprocess_cfg)


class EpochCallback(TrainerCallback):
    """Tells a `ClipDataset` the epoch at the start of each epoch of `transformers.Trainer.train`, resumed runs
    included (`state.epoch` is restored from the checkpoint before the first `on_epoch_begin`)."""

    def __init__(self, dataset: ClipDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch = epochs done so far as a float (1.5 = halfway through the second epoch); its floor is the
        # epoch about to run. A tiny tolerance absorbs float error in epoch + steps / steps_per_epoch.
        self.dataset.set_epoch(int(np.floor((state.epoch or 0.0) + 1e-9)))


@dataclass
class ClipCollator:
    """List of `ClipDataset` items -> {"pixel_values" (B, 3, S, S), "input_ids" (B, L), "attention_mask" (B, L)}
    with L the longest tokenized caption in the batch (at most the tokenizer's context length).
    Distillation: items' "teacher_pixel_values" are stacked too, and with a `teacher_tokenizer` the same captions
    become "teacher_input_ids" / "teacher_attention_mask" (B, L_t)."""
    tokenizer: Any
    teacher_tokenizer: Any = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if features and "caption" not in features[0]:
            raise KeyError(f"batch items have keys {sorted(features[0])}, no 'caption': the HF Trainer drops columns "
                           "the model's forward does not name; set TrainingArguments(remove_unused_columns=False)")
        pixel_values = torch.stack([f["pixel_values"] for f in features])  # (B, 3, S, S)
        captions = [f["caption"] for f in features]
        batch = {"pixel_values": pixel_values, **trim_tokens(self.tokenizer(captions))}
        if features and "teacher_pixel_values" in features[0]:
            batch["teacher_pixel_values"] = torch.stack([f["teacher_pixel_values"] for f in features])  # (B, 3, S_t, S_t)
        if self.teacher_tokenizer is not None:
            batch.update({f"teacher_{k}": v for k, v in trim_tokens(self.teacher_tokenizer(captions)).items()})
        return batch


def load_records(path: str | Path, image_root: str | Path | None = None, on_bad: BadSamplePolicy = "error",
                 max_samples: int | None = None) -> list[CaptionRecord]:
    """Records of a caption file (validation / test sets for `evaluate_retrieval`), optionally the first
    `max_samples` images."""
    records = read_caption_file(path, image_root=image_root, on_bad=on_bad)
    return records[:max_samples] if max_samples is not None else records


def split_records(records: list[CaptionRecord], test_size: float | int, seed: int = 0
                  ) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """Split by image (never one image's captions on both sides) with `datasets`' seeded shuffle split.
    test_size: a fraction in (0, 1) or a number of images."""
    if len(records) < 2:
        raise ValueError(f"cannot split {len(records)} record(s) into a training and a held-out part")
    parts = datasets.Dataset.from_dict({"index": list(range(len(records)))}).train_test_split(
        test_size=test_size, seed=seed)
    return ([records[i] for i in sorted(parts["train"]["index"])],
            [records[i] for i in sorted(parts["test"]["index"])])
