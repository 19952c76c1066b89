"""`python -m miniclip.apps.shard CAPTIONS.json OUT_DIR --shard_size N [--image_size S] [--format parquet]`: any
caption file miniclip reads -> webdataset tar shards as img2dataset writes them (`{key}.jpg`, `{key}.txt` with the
first caption, `{key}.json` with all of them), or Parquet files with image bytes, ready for `--streaming true`.

Every image is decoded once here, so a corrupt file fails (or, with --on_bad skip, is counted and left out) now
rather than mid-run. Leaves out on purpose: downloading URLs (img2dataset does that) and writing to object stores.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from PIL import Image
from tqdm.auto import tqdm

from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.config import check_literal
from miniclip.data.captions import BadSamplePolicy, CaptionRecord, read_caption_file
from miniclip.files import atomic_write_json
from miniclip.transforms import ImageDecodeError, load_image

logger = logging.getLogger("miniclip.shard")
ShardFormat = Literal["webdataset", "parquet"]
SUFFIX = {"webdataset": "tar", "parquet": "parquet"}


@dataclass
class ShardArguments:
    caption_file: str = field(metadata={"help": "Caption file (JSON list, JSON Lines or CSV, as train.py reads)."})
    output_dir: str = field(metadata={"help": "Folder for shard-00000.tar ... and index.json."})
    shard_size: int = field(default=1000, metadata={"help": "Images per shard (open_clip / img2dataset: 10000)."})
    image_size: int | None = field(default=None, metadata={"help": (
        "Resize the shorter side to this many pixels (never up) and re-encode as JPEG; default: JPEG files are "
        "copied byte for byte, other formats re-encoded as JPEG at full size.")})
    format: ShardFormat = field(default="webdataset", metadata={"help": "'webdataset' (.tar) or 'parquet'."})
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of re-encoded images."})
    image_root: str | None = field(default=None, metadata={"help": "Folder image paths are relative to."})
    on_bad: BadSamplePolicy = field(default="error", metadata={"help": (
        "Bad entries and undecodable images: 'error' stops naming them, 'skip' leaves them out and counts them.")})

    def __post_init__(self):
        check_literal(self.format, ShardFormat, "format")
        check_literal(self.on_bad, BadSamplePolicy, "on_bad")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size={self.shard_size} must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size={self.image_size} must be a positive number of pixels")


def encode_jpeg(record: CaptionRecord, image_size: int | None, quality: int) -> bytes:
    """The image as JPEG bytes: the file itself when it is a JPEG and no resize is asked, else re-encoded. The
    image is always decoded, so a corrupt file raises ImageDecodeError here."""
    image = load_image(record.image)
    with Image.open(record.image) as probe:
        is_jpeg = probe.format == "JPEG"
    if is_jpeg and (image_size is None or min(image.size) <= image_size):
        return record.image.read_bytes()
    if image_size is not None and min(image.size) > image_size:
        scale = image_size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def samples(records: list[CaptionRecord], args: ShardArguments):
    """(key, jpeg bytes, captions) per usable record; keys are the record's index, 9 digits (img2dataset's width)."""
    skipped = 0
    for index, record in enumerate(tqdm(records, desc="images", unit="img")):
        try:
            data = encode_jpeg(record, args.image_size, args.jpeg_quality)
        except ImageDecodeError as e:
            if args.on_bad == "error":
                raise ImageDecodeError(f"{args.caption_file}: entry {index}: {e}. Fix the image, or pass "
                                       "--on_bad skip") from None
            skipped += 1
            logger.warning("skipping entry %d: %s", index, e)
            continue
        yield f"{index:09d}", data, list(record.captions)
    if skipped:
        logger.warning("skipped %d undecodable image(s) of %d", skipped, len(records))


def write_webdataset(items, folder: Path, shard_size: int, mtime: int = 0) -> None:
    """webdataset's own ShardWriter. Members get a whole-second `mtime` (the caption file's): with webdataset's
    default (the float time of writing) every member carries a PAX header, which doubles the tar headers each
    reader parses (Flickr8k shards: 2,600-3,200 raw rows/s with them, 5,200 without); the shards are
    also byte-identical for the same input."""
    import webdataset as wds
    with wds.ShardWriter(str(folder / "shard-%05d.tar"), maxcount=shard_size, verbose=0, mtime=mtime) as sink:
        for key, data, captions in items:
            sink.write({"__key__": key, "jpg": data, "txt": captions[0],
                        "json": {"key": key, "caption": captions[0], "captions": captions}})


def write_parquet(items, folder: Path, shard_size: int) -> None:
    """Parquet through `datasets`, so the image column carries the `Image` feature (bytes) in the file's schema."""
    import datasets
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "caption": datasets.List(datasets.Value("string"))})
    rows, shard = [], 0

    def flush():
        nonlocal rows, shard
        table = datasets.Dataset.from_dict({"key": [r[0] for r in rows],
                                            "image": [{"bytes": r[1], "path": None} for r in rows],
                                            "caption": [r[2] for r in rows]}, features=features)
        table.to_parquet(str(folder / f"shard-{shard:05d}.parquet"))
        rows, shard = [], shard + 1

    for item in items:
        rows.append(item)
        if len(rows) == shard_size:
            flush()
    if rows:
        flush()


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    positional = [a for a in argv[:2] if not a.startswith("-")]  # CAPTIONS OUT_DIR, as the usage line shows
    argv = [*(f"--{name}={value}" for name, value in zip(("caption_file", "output_dir"), positional)),
            *argv[len(positional):]]
    args = parse_dataclass(ShardArguments, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    records = read_caption_file(args.caption_file, image_root=args.image_root, on_bad=args.on_bad)
    out = Path(args.output_dir)
    suffix = SUFFIX[args.format]
    if any(out.glob(f"shard-*.{suffix}")):
        raise ValueError(f"{out} already holds shard-*.{suffix} files; pick an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    # Written in a temporary folder and moved in when complete: an interrupted run leaves no half shard behind.
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        write = (partial(write_webdataset, mtime=int(Path(args.caption_file).stat().st_mtime))
                 if args.format == "webdataset" else write_parquet)
        counted = []
        write(((counted.append(k) or (k, d, c)) for k, d, c in samples(records, args)), Path(tmp), args.shard_size)
        shards = sorted(p.name for p in Path(tmp).glob(f"shard-*.{suffix}"))
        if not counted:
            raise ValueError(f"{args.caption_file}: no image could be decoded; no shard written")
        for name in shards:
            os.replace(Path(tmp) / name, out / name)
    pattern = f"shard-{{00000..{len(shards) - 1:05d}}}.{suffix}" if len(shards) > 1 else shards[0]
    atomic_write_json(out / "index.json", {"format": args.format, "shards": shards, "samples": len(counted),
                                           "pattern": pattern, "source": str(Path(args.caption_file).resolve()),
                                           "image_size": args.image_size})
    logger.info("wrote %d samples in %d shard(s): --train_file '%s' --streaming true", len(counted), len(shards),
                out / pattern)
    return out


if __name__ == "__main__":
    run_cli(main, prog="miniclip.apps.shard")
