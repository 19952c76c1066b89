"""Streamed, sharded training data: webdataset tars (img2dataset / open_clip's `{key}.jpg` + `{key}.txt` / `.json`),
Parquet / Arrow files with image bytes and captions, or a `datasets` folder (`save_to_disk`), read as a
`datasets.IterableDataset`: nothing is read in full and no file is checked at start-up. Split by node with
`datasets.distributed.split_dataset_by_node`, by dataloader worker by `datasets` itself, shuffled with a buffer, and
resumed exactly from torchdata's `StatefulDataLoader` state saved with each checkpoint (`StreamStateCallback`;
with a shuffle buffer, by re-reading the pass's rows up to the checkpoint without decoding them).

Leaves out on purpose: remote object stores (fsspec URLs go through `datasets` unchanged but are untested here),
resampling shards with replacement (webdataset's `resampled=True`), and weighting several sources.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Callable, Literal

import datasets
import torch
from braceexpand import braceexpand
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import TrainerCallback

from miniclip.config import ClipConfig, check_literal
from miniclip.data.captions import CAPTION_KEYS, IMAGE_KEYS, BadSamplePolicy, CaptionRecord
from miniclip.data.dataset import CaptionMode, augment_seed, caption_choice
from miniclip.files import atomic_write, atomic_write_json
from miniclip.transforms import ImageDecodeError, image_transform, load_image

logger = logging.getLogger(__name__)

StreamFormat = Literal["webdataset", "parquet", "arrow", "disk"]
SUFFIX_FORMAT = {".tar": "webdataset", ".parquet": "parquet", ".arrow": "arrow"}
# Column names for the image bytes: webdataset extensions first (img2dataset writes .jpg), then the caption files'
# own image keys (a Parquet / datasets table with an "image" column).
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp") + IMAGE_KEYS
STREAM_STATE = "stream_state.json"  # per checkpoint: every process's dataloader state, by rank


def stream_source(path: str | Path) -> tuple[StreamFormat, list[str]] | None:
    """(format, files) when `path` names shards, None when it is a caption file (JSON / JSON Lines / CSV).

    Accepted: one .tar / .parquet / .arrow file, a brace pattern (`shard-{00000..00099}.tar`), a glob, a folder of
    such files, or a `save_to_disk` folder. Every named file must exist: a missing shard fails here, by name."""
    text = str(path)
    if Path(text).is_dir():
        if (Path(text) / "state.json").is_file() or (Path(text) / "dataset_dict.json").is_file():
            return "disk", [text]
        for suffix in SUFFIX_FORMAT:
            files = sorted(str(p) for p in Path(text).glob(f"*{suffix}"))
            if files:
                return SUFFIX_FORMAT[suffix], files
        raise FileNotFoundError(f"{text}: a folder with no .tar / .parquet / .arrow shards and no save_to_disk "
                                "dataset. Fix: point --train_file at the shards, e.g. 'shards/shard-{00000..00009}.tar'")
    files = [f for pattern in braceexpand(text) for f in (sorted(glob.glob(pattern)) if glob.has_magic(pattern)
                                                          else [pattern])]
    suffixes = {Path(f).suffix.lower() for f in files}
    if not files or not suffixes <= set(SUFFIX_FORMAT):
        if "{" in text or glob.has_magic(text):
            raise FileNotFoundError(f"{text}: the pattern matches no .tar / .parquet / .arrow file")
        return None
    if len(suffixes) > 1:
        raise ValueError(f"{text}: mixes {sorted(suffixes)} files; give one kind of shard per source")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{text}: {len(missing)} of {len(files)} shard(s) not found, first {missing[0]}")
    return SUFFIX_FORMAT[suffixes.pop()], files


def load_rows(path: str | Path) -> datasets.IterableDataset:
    """The undecoded rows of a shard source as a `datasets.IterableDataset`, images as bytes (`decode=False`)."""
    source = stream_source(path)
    if source is None:
        raise ValueError(f"{path} is not a shard source (.tar / .parquet / .arrow / save_to_disk folder)")
    kind, files = source
    if kind == "disk":
        table = datasets.load_from_disk(files[0])
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(table)}; point at one split's folder")
        rows = table.to_iterable_dataset(num_shards=max(1, len(table.cache_files)))
    else:
        rows = datasets.load_dataset(kind, data_files={"train": files}, split="train", streaming=True)
    for name, feature in (rows.features or {}).items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))  # bytes: decoded once, by load_image
    return rows


def _column(features: dict, names: tuple[str, ...], what: str, path: str) -> str | None:
    found = next((n for n in names if n in features), None)
    if found is None and what:
        raise ValueError(f"{path}: no {what} column (one of {list(names)}) among {sorted(features)}")
    return found


def row_captions(row: dict, caption_column: str | None) -> list[str]:
    """A row's captions: `json["captions"]` (miniclip.apps.shard writes all of an image's captions there), else the
    `.txt` file (open_clip reads that), else `json["caption"]` (img2dataset), else a caption column."""
    meta = row.get("json") if isinstance(row.get("json"), dict) else {}
    value = meta.get("captions") or row.get("txt") or meta.get("caption")
    if value is None and caption_column is not None:
        value = row.get(caption_column)
    values = [value] if isinstance(value, str) else list(value or [])
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def row_key(row: dict, image: bytes | None) -> str:
    """webdataset's `__key__`, a `key` column, else the CRC32 of the image bytes (Parquet rows have no key)."""
    key = row.get("__key__") or row.get("key")
    return str(key) if key is not None else f"{zlib.crc32(image or b''):08x}"


def extract_records(path: str | Path, folder: str | Path, limit: int | None = None,
                    on_bad: BadSamplePolicy = "error") -> list[CaptionRecord]:
    """Evaluation records from a shard source: the first `limit` samples (all when None), their images written to
    `folder` as files (atomically; kept for the next run), so retrieval evaluation reads them like a caption
    file's. Meant for validation / test sets, which are small; training data is streamed instead."""
    rows = load_rows(path)
    features = rows.features or {}
    image_column = _column(features, IMAGE_COLUMNS, "image", str(path))
    caption_column = _column(features, CAPTION_KEYS, "", str(path))
    folder = Path(folder)
    records, skipped = [], 0
    for row in rows:
        if limit is not None and len(records) >= limit:
            break
        image = row.get(image_column)
        data = image.get("bytes") if isinstance(image, dict) else image
        key, captions = row_key(row, data), row_captions(row, caption_column)
        target = folder / f"{zlib.crc32(key.encode()):08x}-{len(records):06d}.img"  # keys may hold any character
        try:
            if not captions or data is None:
                raise ValueError("no caption" if data is not None else "no image bytes")
            if not target.is_file():
                load_image(io.BytesIO(data), draft_size=64)  # decodable, or the policy decides now
                atomic_write(target, lambda tmp: tmp.write_bytes(data))
        except ValueError as e:
            if on_bad == "error":
                raise ImageDecodeError(f"{path}: sample {key}: {e}. Fix the shard, or pass --on_bad skip") from None
            skipped += 1
            logger.warning("%s: skipping sample %s: %s", path, key, e)
            continue
        records.append(CaptionRecord(image=target.resolve(), captions=tuple(captions)))
    if skipped:
        logger.warning("%s: skipped %d bad sample(s)", path, skipped)
    if not records:
        raise ValueError(f"{path}: no usable evaluation samples")
    return records


class _StreamDecode:
    """One raw row -> {"pixel_values", "caption", "key"}, or None for a bad sample under --on_bad skip. Caption
    choice and augmentation are pure functions of (seed, epoch, key), as in dataset.py, so workers and resumes
    agree."""

    def __init__(self, transform: Callable, image_column: str, caption_column: str | None, caption_mode: str,
                 seed: int, epoch: torch.Tensor, on_bad: str, draft_size: int | None):
        self.transform, self.image_column, self.caption_column = transform, image_column, caption_column
        self.caption_mode, self.seed, self.epoch, self.on_bad, self.draft_size = (
            caption_mode, seed, epoch, on_bad, draft_size)
        self.skipped = 0  # this worker's count

    def __call__(self, row: dict) -> dict[str, Any] | None:
        image = row.get(self.image_column)
        data = image.get("bytes") if isinstance(image, dict) else image
        key, where = row_key(row, data), row.get("__url__") or "stream"
        try:
            captions = row_captions(row, self.caption_column)
            if not captions:
                raise ValueError("no caption")
            if data is None:
                raise ImageDecodeError(f"no image bytes in column {self.image_column!r}")
            decoded = load_image(io.BytesIO(data), self.draft_size)
        except ValueError as e:  # ImageDecodeError is a ValueError
            if self.on_bad == "error":
                raise ImageDecodeError(f"{where}: sample {key}: {str(e).replace('<_io.BytesIO object', 'bytes')}. "
                                       "Fix the shard, or pass --on_bad skip to drop such samples") from None
            self.skipped += 1
            logger.warning("skipping bad sample %s in %s (%d skipped so far in this process): %s", key, where,
                           self.skipped, e)
            return None
        index, epoch = zlib.crc32(key.encode()), int(self.epoch)
        caption = captions[caption_choice(self.seed, epoch, index, len(captions)) if self.caption_mode == "random"
                           else 0]
        with torch.random.fork_rng(devices=[]):  # see dataset._Decode: augmentation from (seed, epoch, sample)
            torch.default_generator.manual_seed(augment_seed(self.seed, epoch, index))
            pixel_values = self.transform(decoded)  # (3, S, S)
        return {"pixel_values": pixel_values, "caption": caption, "key": key}


class StreamedPairs(torch.utils.data.IterableDataset):
    """A streamed source of {"pixel_values" (3, S, S), "caption", "key"} items; `split_by_node` gives one process
    its part. torchdata's StatefulDataLoader calls `state_dict` / `load_state_dict` in every worker.

    Resuming: without a shuffle buffer, the `datasets` stream's own state (shard and row position) is exact and
    instant. With one it is not (datasets does not save the buffer's content), so the state is the number of raw
    rows this worker has read in the pass, and a resumed worker reads the same seeded stream again from the pass's
    start, dropping that many rows undecoded: exact, for the cost of re-reading the bytes (no image decode)."""

    def __init__(self, rows: datasets.IterableDataset, decode: _StreamDecode, epoch: torch.Tensor, source: str,
                 replay: bool):
        self.rows, self.decode, self._epoch, self.source, self.replay = rows, decode, epoch, source, replay
        self.rows_read, self._skip = 0, 0  # raw rows read in this pass, rows to drop on a resumed pass

    def __iter__(self):
        skip, self._skip, self.rows_read = self._skip, 0, 0
        if skip:
            logger.info("%s: re-reading %d row(s) of pass %d to reach the checkpoint's place in the shuffle buffer",
                        self.source, skip, self.epoch)
        for row in self.rows:
            self.rows_read += 1
            if self.rows_read > skip:
                item = self.decode(row)
                if item is not None:
                    yield item

    @property
    def n_shards(self) -> int:
        return self.rows.num_shards

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """A new pass: the shard order, the shuffle buffer and the caption / augmentation draws change with it."""
        self._epoch.fill_(int(epoch))
        self.rows.set_epoch(int(epoch))

    def state_dict(self) -> dict:
        return {"rows_read": self.rows_read} if self.replay else self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.replay != ("rows_read" in state):
            raise ValueError("the saved stream state was written with a different --shuffle_buffer (0 or not). "
                             "Fix: resume with the run's own --shuffle_buffer")
        if self.replay:
            self._skip = int(state["rows_read"])
        else:
            self.rows.load_state_dict(state)

    def split_by_node(self, rank: int, world_size: int) -> "StreamedPairs":
        """This process's part: whole shards when their number divides by world_size, else every world_size-th
        sample (datasets' own rule), so each sample is seen once per pass across all processes."""
        if world_size == 1:
            return self
        return StreamedPairs(split_dataset_by_node(self.rows, rank=rank, world_size=world_size), self.decode,
                             self._epoch, self.source, self.replay)


def build_stream(path: str | Path, config: ClipConfig, train: bool = True, caption_mode: CaptionMode = "random",
                 seed: int = 0, shuffle_buffer: int = 1000, on_bad: BadSamplePolicy = "error",
                 image_size: int | None = None, draft: bool = True) -> StreamedPairs:
    """The streamed training data for a model config (its family's transform; train: random resized crop).

    shuffle_buffer: samples held by datasets' shuffle buffer (0 = shard order shuffled per pass, samples in shard
    order). The buffer is filled from one shard at a time (max_buffer_input_shards=1): with datasets 5.x's
    multi-shard buffer a shuffled stream reports fewer shards than it has, which starves dataloader workers and
    nodes (huggingface/datasets#8669)."""
    check_literal(caption_mode, CaptionMode, "caption_mode")
    check_literal(on_bad, BadSamplePolicy, "on_bad")
    rows = load_rows(path)
    features = rows.features or {}
    image_column = _column(features, IMAGE_COLUMNS, "image", str(path))
    caption_column = _column(features, CAPTION_KEYS, "", str(path))
    if caption_column is None and not {"txt", "json"} & set(features):
        raise ValueError(f"{path}: no caption column (txt, json, or one of {list(CAPTION_KEYS)}) among "
                         f"{sorted(features)}")
    rows = rows.shuffle(seed=seed, buffer_size=max(1, shuffle_buffer), max_buffer_input_shards=1)
    size = image_size or config.vision_cfg.image_size
    epoch = torch.zeros((), dtype=torch.long).share_memory_()  # read by persistent workers, as in dataset.py
    decode = _StreamDecode(image_transform(config, train=train, image_size=size), image_column, caption_column,
                           caption_mode, seed, epoch, on_bad, size if draft else None)
    return StreamedPairs(rows, decode, epoch, str(path), replay=shuffle_buffer > 0)


class StreamLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader over one process's StreamedPairs, with the Trainer's `set_epoch` (called at
    each pass, counted from 0 again after a resume) offset by the pass the saved state was in."""

    def __init__(self, dataset: StreamedPairs, **kwargs):
        super().__init__(dataset, **kwargs)
        self.epoch_offset, self._resumed = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(self.epoch_offset + epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "loader": super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_offset, self._resumed = int(state["epoch"]), True
        self.dataset.set_epoch(self.epoch_offset)
        super().load_state_dict(state["loader"])

    def __iter__(self):
        iterator = super().__iter__()
        if not self._resumed:
            return iterator
        self._resumed = False
        first = next(iterator, None)
        if first is not None:
            return itertools.chain([first], iterator)
        # The checkpoint was taken at the end of a pass: the restored pass is empty, and the Trainer would stop on
        # an empty epoch. Go on with the next pass, as the uninterrupted run did.
        self.epoch_offset += 1
        self.dataset.set_epoch(self.epoch_offset)
        return super().__iter__()


def stream_loader(dataset: StreamedPairs, batch_size: int, collate_fn, args) -> StreamLoader:
    """This process's loader: the node split, then the Trainer's worker settings. drop_last: a contrastive batch
    gathered across processes needs the same size everywhere, so a pass's short last batch is dropped."""
    part = dataset.split_by_node(args.process_index, args.world_size)
    workers = args.dataloader_num_workers
    if workers > part.n_shards:
        logger.warning("%s: %d dataloader workers but %d shard(s) for this process: %d worker(s) will idle. Fix: "
                       "write more shards (python -m miniclip.apps.shard --shard_size)", dataset.source, workers,
                       part.n_shards, workers - part.n_shards)
    return StreamLoader(part, batch_size=batch_size, collate_fn=collate_fn, num_workers=workers, drop_last=True,
                        pin_memory=args.dataloader_pin_memory,
                        persistent_workers=args.dataloader_persistent_workers and workers > 0,
                        prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None)


class StreamStateCallback(TrainerCallback):
    """Saves every process's loader state (StreamLoader.state_dict) into each checkpoint as stream_state.json, and
    loads this process's entry before the first step of a resumed run: the stream continues where the checkpoint
    left it instead of re-reading everything before it. Entries are by rank, so resume with the same number of
    processes and workers."""

    def __init__(self, resume_from: str | None = None):
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.resume_from is None or not isinstance(train_dataloader, StreamLoader):
            return
        path = Path(self.resume_from) / STREAM_STATE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: checkpoint {self.resume_from} was not written by a streamed "
                                    "run. Fix: resume a streamed run from its own checkpoints")
        saved = json.loads(path.read_text())
        entry = saved["ranks"].get(str(args.process_index))
        if saved["world_size"] != args.world_size or entry is None:
            raise ValueError(f"{path} holds the stream state of {saved['world_size']} process(es); this run has "
                             f"{args.world_size}. Fix: resume with the same number of processes")
        if saved.get("workers", args.dataloader_num_workers) != args.dataloader_num_workers:
            raise ValueError(f"{path} was written with --dataloader_num_workers {saved['workers']}; this run has "
                             f"{args.dataloader_num_workers}. Fix: resume with the same number of workers (each "
                             "worker's position in its shards is saved)")
        train_dataloader.load_state_dict(entry)
        logger.info("stream resumed from %s (pass %d)", path, entry["epoch"])

    def on_save(self, args, state, control, train_dataloader=None, **kwargs):
        if not isinstance(train_dataloader, StreamLoader):
            return
        states = [train_dataloader.state_dict()]
        if args.world_size > 1:
            gathered = [None] * args.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(folder / STREAM_STATE, {"world_size": args.world_size,
                                                      "workers": args.dataloader_num_workers,
                                                      "ranks": {str(r): s for r, s in enumerate(states)}})
