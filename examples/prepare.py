"""Offline helpers for the example scripts: save an untrained starting checkpoint, or lay out the built-in
synthetic shapes as English-only / Chinese-only caption files or as a zero-shot image folder (one subfolder per
shape). Nothing is downloaded.

    python examples/prepare.py --task checkpoint --model_config tiny-chinese-vit --output_dir output/examples/start
    python examples/prepare.py --task captions --language zh --output_dir output/examples/shapes_zh
    python examples/prepare.py --task classes --output_dir output/examples/shapes_by_class
    python examples/prepare.py --task towers --output_dir output/examples/towers   # tiny timm ViT + tiny BERT
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

Task = Literal["checkpoint", "captions", "classes", "towers"]
Language = Literal["en", "zh"]
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class PrepareArguments:
    task: Task = field(metadata={"help": "checkpoint | captions | classes | towers"})
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


def write_towers(args: PrepareArguments) -> None:
    """Stand-ins for hub models, randomly initialised: a 2-block ViT at 64px saved the way timm saves a model
    (output_dir/vit: config.json + model.safetensors), a 2-layer BERT with a WordPiece vocabulary of the synthetic
    captions' words saved by transformers (output_dir/bert), and output_dir/model.json pointing at both."""
    import timm
    import torch
    from timm.models import save_for_hf
    from transformers import BertConfig, BertModel, BertTokenizer
    from miniclip.data.synthetic import ensure_synthetic
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0)
    save_for_hf(vit, out / "vit", safe_serialization=True)
    captions = [c for e in json.loads(ensure_synthetic().train_file.read_text(encoding="utf-8")) for c in e["caption"]]
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words + letters + [f"##{c}" for c in letters])]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(out / "bert")
    tokenizer.save_pretrained(out / "bert")
    config = {"embed_dim": 64,
              "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "pretrained": str(out / "vit"),
                             "timm_pool": "", "timm_proj": "linear"},
              "text_cfg": {"hf_model_name": str(out / "bert"), "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear"}}
    (out / "model.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}/vit (timm), {out}/bert (transformers) and {out}/model.json")


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()
    {"checkpoint": save_checkpoint, "captions": write_captions, "classes": write_classes,
     "towers": write_towers}[arguments.task](arguments)
