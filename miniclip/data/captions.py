"""Caption files -> validated records, one per image: the tutorial's JSON list
(`[{"image": "images/x.jpg", "caption": [...]}]`), JSON Lines, or CSV / TSV as open_clip and transformers' run_clip
write them (separator sniffed from the header, one row per caption; rows of the same image become one record).
Relative image paths (`/` or Windows `\\` separators) are relative to the caption file unless `image_root` is given;
absolute paths are taken as they are unless `confine_to_root` (for images served to others, as the demo does).

Leaves out on purpose: opening images (data/dataset.py decodes them lazily, where a corrupt file is found).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class CaptionColumns:
    """Which keys hold the image path and the caption(s): None = the first of IMAGE_KEYS / CAPTION_KEYS present."""
    image: str | None = None
    caption: str | None = None


@dataclass
class CaptionFileOptions:
    """How to read other tools' caption files: the command-line options shared by training and evaluation."""
    image_column: str | None = field(default=None, metadata={"help": (
        "Key / CSV column with the image path (transformers' run_clip name); default: the first of "
        f"{list(IMAGE_KEYS)} present.")})
    caption_column: str | None = field(default=None, metadata={"help": (
        f"Key / CSV column with the caption(s); default: the first of {list(CAPTION_KEYS)} present.")})
    csv_separator: str | None = field(default=None, metadata={"help": (
        "CSV / TSV separator (open_clip's --csv-separator); default: sniffed from the header line (tab, comma, "
        "semicolon or bar). '\\t' or 'tab' for a tab.")})
    confine_to_image_root: bool = field(default=False, metadata={"help": (
        "Refuse image paths outside the image root (absolute or ../ paths); the demo always does.")})

    def caption_file_kwargs(self) -> dict:
        """The keyword arguments of `read_caption_file` these options set."""
        return dict(columns=CaptionColumns(self.image_column, self.caption_column), csv_separator=self.csv_separator,
                    confine_to_root=self.confine_to_image_root)


class CaptionFileError(ValueError):
    """A caption file, or one of its entries, cannot be used. The message names the file and the entry."""


CSV_SEPARATORS = ("\t", ",", ";", "|")


def sniff_separator(header: str) -> str:
    """The separator of a CSV / TSV file from its header line: the candidate that splits it into the most columns
    (a header holds column names, not free text, so captions with commas cannot mislead it)."""
    return max(CSV_SEPARATORS, key=header.count)  # ties: the first, tab (open_clip's default)


def _read_csv(path: Path, text: str, separator: str | None) -> list[dict]:
    if separator is None:
        separator = "\t" if path.suffix.lower() == ".tsv" else sniff_separator(text.split("\n", 1)[0])
    separator = {"\\t": "\t", "tab": "\t"}.get(separator, separator)  # a tab typed on a command line
    if len(separator) != 1:
        raise CaptionFileError(f"csv_separator={separator!r} must be one character (e.g. ',' or a tab)")
    return list(csv.DictReader(io.StringIO(text), delimiter=separator))


def _read_entries(path: Path, csv_separator: str | None = None) -> list:
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
        return _read_csv(path, text, csv_separator)
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


def _pick(entry: dict, keys: tuple[str, ...], column: str | None, what: str):
    """The value of `column` when the user named one (missing: an error listing the entry's keys), else of the
    first of the usual `keys` present."""
    if column is not None:
        if column not in entry:
            raise ValueError(f"no {what} column {column!r}; the entry has {sorted(entry)}")
        return entry[column]
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def resolve_image_path(image: str, root: Path, confine_to_root: bool = False) -> Path:
    """A caption file's image path -> an absolute path. `\\` counts as a separator too (caption files written on
    Windows: the tutorial's en_val.json stores `images\\x.jpg`), so file names containing a backslash are not
    supported. Absolute paths stay as they are unless `confine_to_root`."""
    image_path = (root / image.strip().replace("\\", "/")).resolve()
    if confine_to_root and not image_path.is_relative_to(root):
        raise ValueError(f"image path {image!r} is outside the image root {root} (refused: images are served "
                         "from that root only)")
    return image_path


def _parse_entry(entry, root: Path, columns: CaptionColumns, confine_to_root: bool) -> CaptionRecord:
    """One entry -> CaptionRecord, or a ValueError saying what is wrong with it (the caller adds file and index)."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is a {type(entry).__name__}, not an object with image and caption keys")
    image = _pick(entry, IMAGE_KEYS, columns.image, "image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"no image path (one of the keys {list(IMAGE_KEYS)} with a non-empty string, or name the "
                         "column with --image_column)")
    captions = _pick(entry, CAPTION_KEYS, columns.caption, "caption")
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions:
        raise ValueError(f"captions must be a non-empty list of strings (one of the keys {list(CAPTION_KEYS)}, or "
                         f"name the column with --caption_column), got {captions!r}")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"captions must all be non-empty strings, got {captions!r}")
    return CaptionRecord(image=resolve_image_path(image, root, confine_to_root),
                         captions=tuple(c.strip() for c in captions))


def group_by_image(records: list[CaptionRecord]) -> list[CaptionRecord]:
    """One record per image, captions in file order: a CSV has one row per caption, and an image must be one
    retrieval target (listed twice, its copies would tie with each other and lower recall)."""
    captions: dict[Path, list[str]] = {}
    for record in records:
        captions.setdefault(record.image, []).extend(record.captions)
    return [CaptionRecord(image, tuple(texts)) for image, texts in captions.items()]


def read_caption_file(path: str | Path, image_root: str | Path | None = None,
                      on_bad: BadSamplePolicy = "error", check_files: bool = True,
                      columns: CaptionColumns = CaptionColumns(), csv_separator: str | None = None,
                      confine_to_root: bool = False) -> list[CaptionRecord]:
    """Parse and validate every entry, then group entries of the same image. With on_bad="skip", bad entries are
    dropped and counted in the log. csv_separator=None sniffs it from the header (.tsv: tab)."""
    check_literal(on_bad, BadSamplePolicy, "on_bad")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    root = Path(image_root).resolve() if image_root is not None else path.resolve().parent
    records, skipped = [], 0
    for index, entry in enumerate(_read_entries(path, csv_separator)):
        try:
            record = _parse_entry(entry, root, columns, confine_to_root)
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
    return group_by_image(records)
