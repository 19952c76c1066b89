"""Export a checkpoint (any layout miniclip loads) as a miniclip, Hugging Face, open_clip or ONNX folder.

    python -m miniclip.apps.export --checkpoint run/checkpoint-500 --format onnx --output_dir served/

Leaves out on purpose: pushing to a hub and choosing ONNX opsets (the exporter's default is the tested one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import get_args

from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.checkpoints.layouts import ExportFormat
from miniclip.checkpoints.loading import load_model_and_tokenizer
from miniclip.checkpoints.saving import save_pretrained
from miniclip.config import check_literal
from miniclip.serving.onnx import ONNX_CONFIG, VARIANTS, Variant, read_onnx_config, require_onnx

logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "Checkpoint file / folder / known name, in any layout miniclip loads"})
    output_dir: str = field(metadata={"help": "Folder to write (created; files in it are replaced atomically)"})
    format: str = field(default="onnx", metadata={"help": f"One of {list(get_args(ExportFormat))}"})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": f"ONNX only: which graphs to write, of {list(get_args(Variant))} (fp32 is always needed)"})

    def __post_init__(self):
        check_literal(self.format, ExportFormat, "format")
        for variant in self.variants:
            check_literal(variant, Variant, "variants")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("miniclip").setLevel(logging.INFO)
    args = parse_dataclass(ExportArguments, argv, description=__doc__.split("\n\n")[0])
    if args.format == "onnx":
        try:
            require_onnx()  # fail before the slow model load
        except ImportError as e:
            raise SystemExit(str(e)) from None
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    out = save_pretrained(model, args.output_dir, format=args.format, tokenizer=tokenizer,
                          onnx_variants=tuple(args.variants))
    print(f"wrote {args.format} export of {args.checkpoint} to {out}")
    if args.format == "onnx":
        for variant, m in read_onnx_config(out)["variants"].items():
            print(f"  {variant}: image max |error| {m['image_max_abs_error']:.2e} (min cosine "
                  f"{m['image_min_cosine']:.6f}), text max |error| {m['text_max_abs_error']:.2e} "
                  f"(min cosine {m['text_min_cosine']:.6f}) against PyTorch fp32; see {out / ONNX_CONFIG}")


def cli() -> None:
    """The `miniclip-export` console script (and `python -m miniclip.apps.export`)."""
    run_cli(main, prog="miniclip-export")


if __name__ == "__main__":
    cli()
