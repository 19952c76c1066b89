"""Embed a collection: every image of a folder (or of a caption file), or every caption of a text / caption file, into
one safetensors or parquet file of L2-normalised embeddings, the numbers `encode_image` / `encode_text` give.

    python -m miniclip.apps.embed --checkpoint run/checkpoint-500 --images photos/ --out photos.safetensors
    python -m miniclip.apps.embed --checkpoint served/ --runtime onnx --captions captions.txt --out captions.parquet

Work is done in chunks, each saved under `<out>.parts/` as it finishes, so an interrupted run picks up where it
stopped (same inputs, model and settings; anything else starts the chunk again). Leaves out on purpose: several
processes / GPUs at once (run one command per shard of the folder) and approximate-search indexes.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.apps.search_index import read_image_set
from miniclip.config import check_literal
from miniclip.data.captions import read_caption_file
from miniclip.evaluation.encode import Encoder, flatten_captions
from miniclip.evaluation.feature_cache import (FeatureCacheError, cached_features, files_fingerprint,
                                               model_fingerprint, texts_fingerprint)
from miniclip.files import atomic_write, save_safetensors

logger = logging.getLogger(__name__)

Runtime = Literal["torch", "onnx"]
Precision = Literal["fp32", "bf16"]
OUTPUT_SUFFIXES = (".safetensors", ".parquet")
CAPTION_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")


@dataclass
class EmbedArguments:
    checkpoint: str = field(metadata={"help": "Checkpoint (any layout miniclip loads); with --runtime onnx, a folder "
                                              "written by `python -m miniclip.apps.export --format onnx`"})
    out: str = field(metadata={"help": "Output file: .safetensors (tensor + item list in the metadata) or .parquet"})
    images: str | None = field(default=None, metadata={
        "help": "Folder of images (searched recursively), or a caption file whose images to embed"})
    captions: str | None = field(default=None, metadata={
        "help": "Text file with one caption a line (blank lines skipped), or a caption file (JSON / JSONL / CSV)"})
    image_root: str | None = field(default=None, metadata={
        "help": "Folder a caption file's image paths are relative to (default: the caption file's folder)"})
    runtime: str = field(default="torch", metadata={"help": "torch (the PyTorch model) or onnx (the exported graphs)"})
    onnx_variant: str = field(default="fp32", metadata={"help": "With --runtime onnx: fp32, fp16 or int8 graphs"})
    precision: str = field(default="fp32", metadata={"help": "With --runtime torch: fp32, or bf16 autocast"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1... (default: cuda if available)"})
    batch_size: int = field(default=64, metadata={"help": "Images (or 4x as many captions) per batch"})
    chunk_size: int = field(default=1024, metadata={"help": "Items per saved chunk (the unit of resuming)"})
    no_resume: bool = field(default=False, metadata={"help": "Recompute every chunk, ignoring saved ones"})

    def __post_init__(self):
        if (self.images is None) == (self.captions is None):
            raise ValueError("give exactly one of --images DIR_OR_CAPTION_FILE and --captions FILE")
        check_literal(self.runtime, Runtime, "runtime")
        check_literal(self.precision, Precision, "precision")
        if self.runtime == "onnx" and self.precision != "fp32":
            raise ValueError("--precision bf16 is for --runtime torch; ONNX graphs pick theirs with --onnx_variant "
                             "fp16 or int8")
        if not self.out.endswith(OUTPUT_SUFFIXES):
            raise ValueError(f"--out {self.out}: the file name must end in one of {list(OUTPUT_SUFFIXES)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"batch_size={self.batch_size} and chunk_size={self.chunk_size} must be positive")


def read_captions(path: str | Path, image_root: str | None = None) -> list[str]:
    """A caption file's captions in file order, or a text file's non-blank lines."""
    path = Path(path)
    if path.suffix.lower() in CAPTION_FILE_SUFFIXES:
        return flatten_captions(read_caption_file(path, image_root=image_root, check_files=False))[0]
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no captions (one caption a line expected)")
    return texts


def load_encoder(args: EmbedArguments) -> tuple[Encoder, str]:
    """The Encoder for the chosen runtime, and a fingerprint of the weights it runs (for resuming)."""
    if args.runtime == "onnx":
        from miniclip.serving.onnx import graph_file, onnx_encoder, require_onnx
        try:
            require_onnx()
        except ImportError as e:
            raise SystemExit(str(e)) from None
        encoder = onnx_encoder(args.checkpoint, args.onnx_variant, image_batch_size=args.batch_size,
                               text_batch_size=4 * args.batch_size, progress=False)
        graphs = [Path(args.checkpoint) / graph_file(t, args.onnx_variant) for t in ("image", "text")]
        return encoder, files_fingerprint(graphs)
    from miniclip.checkpoints.loading import load_model_and_tokenizer
    from miniclip.transforms import image_transform
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    model = model.to(device).eval()
    encoder = Encoder(model, image_transform(model.config), tokenizer, device=device,
                      dtype=torch.bfloat16 if args.precision == "bf16" else None, image_batch_size=args.batch_size,
                      text_batch_size=4 * args.batch_size, progress=False)
    return encoder, model_fingerprint(model)


def _encode_chunk(encoder: Encoder, kind: str, items: list, embed_dim: int) -> dict[str, torch.Tensor]:
    """{"embeds": (n_kept, D), "kept": (n_kept,) positions in `items`}; unreadable images are left out."""
    if kind == "text":
        return {"embeds": encoder.texts(items), "kept": torch.arange(len(items))}
    try:
        embeds, kept = encoder.image_files(items, skip_unreadable=True)
    except ValueError:  # every image of the chunk unreadable (each was logged)
        embeds, kept = torch.empty(0, embed_dim), torch.empty(0, dtype=torch.long)
    return {"embeds": embeds, "kept": kept}


def embed_items(encoder: Encoder, kind: str, items: list, key: dict, parts: Path, chunk_size: int,
                resume: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Encode `items` chunk by chunk, each chunk saved in `parts` under `key` -> ((N_kept, D), kept indices)."""
    embed_dim = encoder.model.config.embed_dim
    chunks, kept = [], []
    with tqdm(total=len(items), desc=f"{kind}s", unit=kind) as bar:
        for number, start in enumerate(range(0, len(items), chunk_size)):
            part = items[start:start + chunk_size]
            chunk_key = {**key, "chunk": number, "start": start}
            compute = lambda: _encode_chunk(encoder, kind, part, embed_dim)  # noqa: E731
            try:
                tensors = cached_features(parts, f"chunk-{number:06d}", chunk_key, compute, overwrite=not resume)
            except FeatureCacheError as e:  # saved by a run with other inputs / settings: recompute it
                logger.info("recomputing chunk %d: %s", number, e)
                tensors = cached_features(parts, f"chunk-{number:06d}", chunk_key, compute, overwrite=True)
            chunks.append(tensors["embeds"])
            kept.extend(start + int(i) for i in tensors["kept"])
            bar.update(len(part))
    return torch.cat(chunks), kept


def write_embeddings(path: Path, kind: str, embeds: torch.Tensor, names: list[str], info: dict) -> None:
    """safetensors: `image_embeds` / `text_embeds` (N, D) with the names in the metadata; parquet: one row each."""
    column = "path" if kind == "image" else "caption"
    if path.suffix == ".safetensors":
        metadata = {**{k: str(v) for k, v in info.items()}, column + "s": json.dumps(names, ensure_ascii=False)}
        save_safetensors({f"{kind}_embeds": embeds.float()}, path, metadata=metadata)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    values = pa.array(embeds.float().numpy().reshape(-1))
    table = pa.table({column: names, "embedding": pa.FixedSizeListArray.from_arrays(values, embeds.shape[1])})
    table = table.replace_schema_metadata({k: str(v) for k, v in info.items()})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("miniclip").setLevel(logging.INFO)
    logging.getLogger("miniclip.evaluation.feature_cache").setLevel(logging.WARNING)  # a line per chunk: the bar says it
    args = parse_dataclass(EmbedArguments, argv, description=__doc__.split("\n\n")[0])
    if args.images is not None:
        image_set = read_image_set(args.images, args.image_root)
        if image_set.missing:
            logger.warning("%d listed images are missing on disk and were left out (first: %s)",
                           len(image_set.missing), image_set.missing[0])
        kind, paths = "image", image_set.images
        items, names, data_key = paths, [str(p) for p in paths], files_fingerprint(paths)
    else:
        kind = "text"
        items = names = read_captions(args.captions, args.image_root)
        data_key = texts_fingerprint(items)
    encoder, weights_key = load_encoder(args)
    key = {"kind": kind, "data": data_key, "weights": weights_key, "runtime": args.runtime,
           "variant": args.onnx_variant, "precision": args.precision, "chunk_size": args.chunk_size}
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    embeds, kept = embed_items(encoder, kind, items, key, parts, args.chunk_size, resume=not args.no_resume)
    info = {"kind": kind, "checkpoint": args.checkpoint, "runtime": args.runtime, "normalized": True,
            "precision": args.onnx_variant if args.runtime == "onnx" else args.precision}
    write_embeddings(out, kind, embeds, [names[i] for i in kept], info)
    shutil.rmtree(parts, ignore_errors=True)  # the output is complete: the chunks are no longer needed
    skipped = len(items) - len(kept)
    print(f"wrote {len(kept)} {kind} embeddings ({embeds.shape[1]} dims) to {out}"
          + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    return out


def cli() -> None:
    """The `miniclip-embed` console script (and `python -m miniclip.apps.embed`)."""
    run_cli(main, prog="miniclip-embed")


if __name__ == "__main__":
    cli()
