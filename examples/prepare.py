"""Offline helpers for the example scripts: save an untrained starting checkpoint, or lay out the built-in
synthetic shapes as English-only / Chinese-only caption files or as a zero-shot image folder (one subfolder per
shape). Nothing is downloaded.

    python examples/prepare.py --task checkpoint --model_config tiny-chinese-vit --output_dir output/examples/start
    python examples/prepare.py --task captions --language zh --output_dir output/examples/shapes_zh
    python examples/prepare.py --task classes --output_dir output/examples/shapes_by_class
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from miniclip.config import check_literal

Task = Literal["checkpoint", "captions", "classes"]
Language = Literal["en", "zh"]
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class PrepareArguments:
    task: Task = field(metadata={"help": "checkpoint | captions | classes"})
    output_dir: str = field(metadata={"help": "Where to write."})
    model_config: str = field(default="tiny-vit", metadata={"help": "checkpoint: the architecture."})
    seed: int = field(default=0, metadata={"help": "checkpoint: the random initialisation."})
    language: Language = field(default="en", metadata={"help": "captions: keep English or Chinese captions."})

    def __post_init__(self):
        check_literal(self.task, Task, "task")
        check_literal(self.language, Language, "language")


def save_checkpoint(args: PrepareArguments) -> None:
    """An untrained model as a miniclip folder: what `--pretrained` / `--checkpoint` need when you have none."""
    import torch
    from miniclip.checkpoints import save_pretrained
    from miniclip.model import MiniClip
    torch.manual_seed(args.seed)
    save_pretrained(MiniClip(args.model_config), args.output_dir)  # tokenizer files (and vocab.txt) included
    print(f"saved an untrained {args.model_config} to {args.output_dir}")


def write_captions(args: PrepareArguments) -> None:
    """train.json / val.json holding only one language's captions; image paths stay relative to the set's root,
    which is written to image_root.txt (pass it to train.py as --image_root)."""
    from miniclip.data.synthetic import ensure_synthetic
    data, out = ensure_synthetic(), Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, source in (("train", data.train_file), ("val", data.validation_file)):
        entries = json.loads(source.read_text(encoding="utf-8"))
        keep = [{"image": e["image"], "caption": [c for c in e["caption"] if bool(CJK.search(c)) == (args.language == "zh")]}
                for e in entries]
        (out / f"{name}.json").write_text(json.dumps(keep, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "image_root.txt").write_text(str(data.root) + "\n")
    print(f"wrote {out}/train.json, val.json ({args.language} captions); images under {data.root}")


def write_classes(args: PrepareArguments) -> None:
    """The synthetic test split as <output_dir>/<shape>/<image>.jpg (links where possible) for zero-shot."""
    from miniclip.data.synthetic import SHAPES, ensure_synthetic
    data, out = ensure_synthetic(), Path(args.output_dir)
    for entry in json.loads(data.test_file.read_text(encoding="utf-8")):
        shape = next(s for s in SHAPES if s in entry["caption"][0])  # the first caption is English
        target = out / shape / Path(entry["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.symlink(data.root / entry["image"], target)
            except OSError:
                shutil.copyfile(data.root / entry["image"], target)
    print(f"wrote {out}/<shape>/: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()
    {"checkpoint": save_checkpoint, "captions": write_captions, "classes": write_classes}[arguments.task](arguments)
