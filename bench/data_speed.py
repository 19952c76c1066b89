"""Data-pipeline rate (JPEG file -> training batch tensors, images/s) with default loader settings, miniclip vs
open_clip's way, so it can be set against the training step rate of train_speed.py (loader rate >= step rate).

  miniclip      data.build_dataset(train=True) (JPEG draft decode, crop on uint8 tensors) + ClipCollator (tokenize, trim) in a DataLoader
                with the HF Trainer's defaults (dataloader_num_workers=0);
  open_clip     what open_clip's CsvDataset does per item: PIL open + full decode, open_clip's training transform,
                tokenize to 77 in the item, default collate; same DataLoader settings.
  stream        the same images as webdataset shards written by `python -m miniclip.apps.shard` (JPEG bytes
                copied), read by data/streaming.py (datasets IterableDataset, shuffle buffer 1000, draft decode,
                torchdata StatefulDataLoader) with the same collator and workers: the `--streaming true` path.
Ablations (--ablations): miniclip+nodraft (full-size decode), miniclip+pil (the random resized crop on PIL images,
as open_clip, instead of on uint8 tensors), miniclip+workers2 and stream+workers2 (2 loader processes each).
Images: Flickr8k from the shared data folder when present (stored at 224 px, so draft decoding has nothing to
skip there), else -- or with --synthetic -- generated 500x375 JPEGs (Flickr's usual photo size) in a temp folder.

    python bench/data_speed.py --images 256 --reps 3 [--synthetic]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (bench_main, data_root, fmt, interleave, markdown_table, median, peak_rss_mb,  # noqa: E402
                          run_worker, spread)

IMPLS = ("miniclip", "open_clip", "stream")
ABLATIONS = ("miniclip+nodraft", "miniclip+pil", "miniclip+workers2", "stream+workers2")


def flickr_caption_file() -> Path | None:
    path = data_root() / "flickr8k" / "en_train.json"
    return path if path.is_file() else None


def make_jpegs(folder: Path, n: int, size=(500, 375)) -> Path:
    """n photo-like JPEGs (smooth gradients + noise, quality 90) and a caption file listing them."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    entries = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1) + yy) % 256, (yy * 2 + i * 13) % 256, (xx + yy * (i % 5)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        entries.append({"image": f"{i:05d}.jpg", "caption": [f"a synthetic photo number {i} with colour bands ."]})
    path = folder / "captions.json"
    path.write_text(json.dumps(entries))
    return path


def write_shards(caption_file: Path, folder: Path, images: int) -> Path:
    """The first `images` entries as webdataset shards (4 shards, so 2 workers each read their own)."""
    from miniclip.apps import shard
    from miniclip.data.dataset import load_records
    subset = folder.parent / "subset.json"
    records = load_records(caption_file, max_samples=images)
    subset.write_text(json.dumps([{"image": str(r.image), "caption": list(r.captions)} for r in records]))
    shard.main([str(subset), str(folder), "--shard_size", str(max(1, -(-len(records) // 4))), "--image_root", "/"])
    return folder


class OpenClipStyleDataset:
    """open_clip's CsvDataset item: (transform(Image.open(path)), tokenize([caption])[0])."""

    def __init__(self, records, transform, tokenizer):
        self.records, self.transform, self.tokenizer = records, transform, tokenizer

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        from PIL import Image
        record = self.records[index]
        return self.transform(Image.open(record.image)), self.tokenizer([record.captions[0]])[0]


def loader(impl: str, records, config, batch: int):
    import open_clip
    import torch
    from miniclip.data.dataset import ClipCollator, ClipDataset, build_dataset
    from miniclip.tokenizer import get_tokenizer
    from miniclip.transforms import pil_train_transform
    base, *opts = impl.split("+")
    workers = 2 if "workers2" in opts else 0
    if base == "miniclip":
        dataset = (ClipDataset(records, pil_train_transform(config), draft_size=config.vision_cfg.image_size)
                   if "pil" in opts else build_dataset(records, config, train=True, caption_mode="random",
                                                       draft="nodraft" not in opts))
        return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                           collate_fn=ClipCollator(get_tokenizer(config)))
    if base == "stream":  # `records` is the shard folder here
        from types import SimpleNamespace
        from miniclip.data.streaming import build_stream, stream_loader
        stream = build_stream(records, config, train=True, caption_mode="random", shuffle_buffer=1000)
        settings = SimpleNamespace(process_index=0, world_size=1, dataloader_num_workers=workers,
                                   dataloader_pin_memory=False, dataloader_persistent_workers=False,
                                   dataloader_prefetch_factor=None)
        return stream_loader(stream, batch, ClipCollator(get_tokenizer(config)), settings)
    if base == "open_clip":
        pre = config.preprocess_cfg
        transform = open_clip.image_transform(config.vision_cfg.image_size, is_train=True, mean=pre.mean, std=pre.std)
        dataset = OpenClipStyleDataset(records, transform, open_clip.get_tokenizer("ViT-B-32"))
        return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    raise ValueError(f"unknown implementation {impl!r}; valid: {IMPLS + ABLATIONS}")


def worker(impl: str, caption_file: str, args) -> dict:
    import torch
    from miniclip.config import load_model_config
    from miniclip.data.dataset import load_records
    torch.set_num_threads(args.threads)
    config = load_model_config(args.config)
    records = caption_file if impl.startswith("stream") else load_records(caption_file, max_samples=args.images)
    batches = loader(impl, records, config, args.batch)
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["pixel_values"] if isinstance(batch, dict) else batch[0])
    return {"images_per_s": n / (time.perf_counter() - start), "peak_mb": peak_rss_mb()}


def measure_all(args, script=Path(__file__)) -> tuple[dict, str]:
    impls = list(args.impls) + (list(ABLATIONS) if args.ablations else [])
    common = ["--config", args.config, "--images", str(args.images), "--batch", str(args.batch),
              "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        caption_file = None if args.synthetic else flickr_caption_file()
        source = f"Flickr8k ({caption_file.parent}, 224 px JPEGs)" if caption_file else "generated 500x375 JPEGs"
        caption_file = caption_file or make_jpegs(Path(tmp), args.images)
        shards = write_shards(caption_file, Path(tmp) / "shards", args.images) if any(
            i.startswith("stream") for i in impls) else None
        jobs = [(impl, str(shards if impl.startswith("stream") else caption_file)) for impl in impls]
        results = interleave(jobs, args.reps, lambda job, rep: run_worker(script, ["--worker", *job, *common],
                                                                          args.threads), label=lambda job: job[0])
    return {impl: runs for (impl, _), runs in results.items()}, source


def table(measured: tuple[dict, str], args) -> str:
    results, source = measured
    ours, rows = results.get("miniclip"), []
    for impl, runs in results.items():
        rate = median(runs, "images_per_s")
        rows.append([impl, fmt(rate, 0), spread(runs, "images_per_s"),
                     f"{median(ours, 'images_per_s') / rate:.2f}x" if ours else "-", fmt(median(runs, "peak_mb"), 0)])
    head = (f"Data pipeline (JPEG -> batch tensors, train transform, batch {args.batch}), {source}, {args.images} "
            f"images, {args.threads} threads, median of {args.reps} runs.\n\n")
    return head + markdown_table(["implementation", "images/s", "range", "miniclip / this", "peak MB"], rows)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic", action="store_true", help="generated full-size JPEGs even when Flickr8k is present")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), help=f"any of {IMPLS + ABLATIONS}")
    p.add_argument("--ablations", action="store_true", help=f"also run {ABLATIONS}")


def main():
    bench_main(__doc__, add_args, worker, measure_all, table, ("IMPL", "CAPTION_FILE"))

if __name__ == "__main__":
    main()
