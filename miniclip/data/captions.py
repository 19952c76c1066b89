"""Caption files -> validated records: the tutorial's JSON list (`[{"image": "images/x.jpg", "caption": [...]}]`),
JSON Lines, or CSV with image / caption columns. Image paths are relative to the caption file unless `image_root`
is given, and may not escape that root.

Leaves out on purpose: opening images (data.py decodes them lazily, where a corrupt file is found).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from miniclip.config import check_literal
from typing import Literal

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["error", "skip"]
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name")
CAPTION_KEYS = ("caption", "captions", "text", "title")


@dataclass(frozen=True)
class CaptionRecord:
    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # one or more non-empty captions


class CaptionFileError(ValueError):
    """A caption file, or one of its entries, cannot be used. The message names the file and the entry."""


def _read_entries(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        entries = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CaptionFileError(f"{path}: line {line_no} is not valid JSON: {e}") from None
        return entries
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{path} is not valid JSON: {e}. Expected a list of "
                               '{"image": "images/x.jpg", "caption": ["...", ...]} objects') from None
    if isinstance(entries, dict) and isinstance(entries.get("data"), list):
        entries = entries["data"]
    if not isinstance(entries, list):
        raise CaptionFileError(f"{path}: top level must be a JSON list of entries, got {type(entries).__name__}")
    return entries


def _pick(entry: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def _parse_entry(entry, index: int, root: Path) -> CaptionRecord:
    """One entry -> CaptionRecord, or a ValueError saying what is wrong with it (the caller adds file and index)."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is a {type(entry).__name__}, not an object with image and caption keys")
    image = _pick(entry, IMAGE_KEYS)
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"no image path (one of the keys {list(IMAGE_KEYS)} with a non-empty string)")
    captions = _pick(entry, CAPTION_KEYS)
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions:
        raise ValueError(f"captions must be a non-empty list of strings (one of the keys {list(CAPTION_KEYS)}), "
                         f"got {captions!r}")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"captions must all be non-empty strings, got {captions!r}")
    image_path = (root / image).resolve()
    if not image_path.is_relative_to(root):
        raise ValueError(f"image path {image!r} escapes the image root {root}")
    return CaptionRecord(image=image_path, captions=tuple(c.strip() for c in captions))


def read_caption_file(path: str | Path, image_root: str | Path | None = None,
                      on_bad: BadSamplePolicy = "error", check_files: bool = True) -> list[CaptionRecord]:
    """Parse and validate every entry. With on_bad="skip", bad entries are dropped and counted in the log."""
    check_literal(on_bad, BadSamplePolicy, "on_bad")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    root = Path(image_root).resolve() if image_root is not None else path.resolve().parent
    records, skipped = [], 0
    for index, entry in enumerate(_read_entries(path)):
        try:
            record = _parse_entry(entry, index, root)
            if check_files and not record.image.is_file():
                raise ValueError(f"image file not found: {record.image}")
        except ValueError as e:
            if on_bad == "error":
                raise CaptionFileError(f"{path}: entry {index}: {e}. "
                                       "Fix the entry, or pass on_bad='skip' to drop bad samples.") from None
            skipped += 1
            logger.warning("%s: skipping entry %d: %s", path, index, e)
            continue
        records.append(record)
    if skipped:
        logger.warning("%s: skipped %d bad entr%s of %d", path, skipped, "y" if skipped == 1 else "ies",
                       skipped + len(records))
    if not records:
        raise CaptionFileError(f"{path}: no usable samples ({skipped} skipped). "
                               'Expected a list of {"image": "images/x.jpg", "caption": ["...", ...]} objects')
    return records
