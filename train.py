#!/usr/bin/env python
"""Train or finetune a MiniClip on image-caption files with the Hugging Face Trainer (one or many processes).

    python train.py                                   # the embedded default run: synthetic shapes, tiny model, CPU
    python train.py --model_config tiny-vit --train_file data/train.json --validation_file data/val.json \\
        --output_dir output/run --per_device_train_batch_size 64 --num_train_epochs 5 --learning_rate 5e-4
    accelerate launch --num_processes 4 train.py --pretrained TinyCLIP-ViT-8M-16-Text-3M ... --bf16 true
    python train.py args.yaml                         # the same flags as a JSON / YAML file

Arguments: ModelArguments and DataArguments below, plus every `transformers.TrainingArguments` flag and the
contrastive ones of `miniclip.trainer.ClipTrainingArguments`. `--resume_from_checkpoint latest` continues from the
newest complete checkpoint in output_dir. Leaves out on purpose: streaming / webdataset inputs.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, set_seed

from miniclip.captions import BadSamplePolicy, CaptionRecord, read_caption_file
from miniclip.config import _check_literal
from miniclip.data import CaptionMode
from miniclip.trainer import ClipTrainer, ClipTrainingArguments, LossKind

logger = logging.getLogger("miniclip.train")
ARGS_FILE_SUFFIXES = (".json", ".yaml", ".yml")
CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last: a checkpoint folder without it is incomplete


@dataclass
class ModelArguments:
    model_config: str | None = field(default=None, metadata={"help": (
        "Model config name (see miniclip.list_model_configs(): tiny-vit, TinyCLIP-ViT-8M-16-Text-3M, ...) or a JSON "
        "file: trains from scratch. With --pretrained: the architecture to load the checkpoint into (default: "
        "the checkpoint's own).")})
    pretrained: str | None = field(default=None, metadata={"help": (
        "Checkpoint to start from: a miniclip / open_clip / OpenAI / Hugging Face / Chinese-CLIP file or folder, "
        "or a known name (see miniclip.checkpoints).")})
    pretrained_format: str = field(default="auto", metadata={"help": "Checkpoint layout of --pretrained ('auto' "
                                                                     "detects it)."})
    image_size: int | None = field(default=None, metadata={"help": (
        "Train at this image size (position embeddings of a pretrained ViT are interpolated).")})
    context_length: int | None = field(default=None, metadata={"help": (
        "Text context length in tokens (a pretrained tower's position embeddings are truncated or extended; "
        "captions are tokenized to this length).")})
    lock_image: bool = field(default=False, metadata={"help": "Freeze the image tower (LiT, Zhai et al. 2022)."})
    lock_image_unlocked_groups: int = field(default=0, metadata={"help": (
        "With --lock_image: leave this many last layer groups of the image tower trainable.")})
    lock_image_freeze_bn_stats: bool = field(default=True, metadata={"help": (
        "BatchNorm layers of the locked image tower keep their running statistics (eval mode).")})
    lock_text: bool = field(default=False, metadata={"help": "Freeze the text tower."})
    lock_text_unlocked_layers: int = field(default=0, metadata={"help": (
        "With --lock_text: leave this many last layers (groups) of the text tower trainable.")})
    unlock_image_step: int | None = field(default=None, metadata={"help": (
        "Two-stage training as Chinese-CLIP: the image tower is locked (as --lock_image) until this optimizer "
        "step, then trained with the rest.")})
    init_logit_scale: float | None = field(default=None, metadata={"help": (
        "Initial log of the logit scale (default: the config's, ln(1/0.07); ln 10 for --loss siglip from "
        "scratch). Also overrides a pretrained value.")})
    learn_logit_scale: bool = field(default=True, metadata={"help": "Whether the logit scale is trained."})
    init_logit_bias: float | None = field(default=None, metadata={"help": (
        "Initial logit bias of the sigmoid loss (default -10 for --loss siglip, as SigLIP).")})
    loss: LossKind = field(default="clip", metadata={"help": (
        "'clip': symmetric cross-entropy (InfoNCE); 'siglip': pairwise sigmoid loss with a learnt bias.")})

    def __post_init__(self):
        _check_literal(self.loss, LossKind, "loss")
        if self.model_config is None and self.pretrained is None:
            raise ValueError("give --model_config NAME (train from scratch) or --pretrained CHECKPOINT (finetune); "
                             "see miniclip.list_model_configs() for the names")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        if self.unlock_image_step is not None:
            if self.unlock_image_step < 1:
                raise ValueError(f"--unlock_image_step={self.unlock_image_step} must be >= 1 (an optimizer step)")
            self.lock_image = True  # stage 1 is a locked image tower


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": (
        'Training captions: a JSON list [{"image": "images/x.jpg", "caption": ["...", ...]}], JSON Lines, or CSV '
        "with image / caption columns. Without it: the embedded default run on a synthetic set.")})
    validation_file: str | None = field(default=None, metadata={"help": (
        "Validation captions (same formats): retrieval recall during training (eval_strategy) and at the end.")})
    test_file: str | None = field(default=None, metadata={"help": "Captions evaluated once, after training."})
    image_root: str | None = field(default=None, metadata={"help": (
        "Folder image paths are relative to (default: the folder of each caption file). Paths may not escape it.")})
    caption_mode: CaptionMode = field(default="random", metadata={"help": (
        "'random': one caption per image per epoch, picked from (seed, epoch, index), so resumes reproduce it; "
        "'all': every caption is its own training pair.")})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    on_bad: BadSamplePolicy = field(default="error", metadata={"help": (
        "Bad samples (missing / corrupt image, empty captions, path outside the root): 'error' stops with the "
        "file and entry; 'skip' drops them and counts them in the log.")})
    augment: bool = field(default=True, metadata={"help": (
        "Random resized crop (scale 0.9-1) on training images; false = the evaluation transform.")})
    synthetic_dir: str | None = field(default=None, metadata={"help": (
        "Default run only: where the synthetic set is cached (default $MINICLIP_CACHE/synthetic or "
        "~/.cache/miniclip/synthetic).")})

    def __post_init__(self):
        _check_literal(self.caption_mode, CaptionMode, "caption_mode")
        _check_literal(self.on_bad, BadSamplePolicy, "on_bad")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be a positive number of images")


# The embedded default run (no --train_file): what it sets unless the command line / args file says otherwise.
DEFAULT_RUN: dict = {
    "model_config": "tiny-vit", "output_dir": "output/default", "caption_mode": "random",
    "per_device_train_batch_size": 64, "per_device_eval_batch_size": 128, "num_train_epochs": 12,
    "learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 50, "lr_scheduler_type": "cosine",
    "logging_steps": 20, "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "use_cpu": True,
    "bf16": True, "seed": 0, "dataloader_num_workers": 0,
}


@dataclass
class RunResult:
    """What `main` did: the output folder, Trainer metrics, and retrieval metrics (None when not evaluated)."""
    output_dir: Path
    train_metrics: dict
    eval_metrics: dict | None
    test_metrics: dict | None
    trainer: ClipTrainer


def default_run_args() -> dict:
    """DEFAULT_RUN, updated by `miniclip.synthetic.DEFAULT_RUN_ARGS` when the synthetic set's module tunes it
    (the hyperparameters that suit the set live next to it)."""
    from miniclip import synthetic
    return {**DEFAULT_RUN, **getattr(synthetic, "DEFAULT_RUN_ARGS", {})}


def _read_args_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"arguments file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except (ValueError, ImportError) as e:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors / YAMLError
        raise ValueError(f"arguments file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"arguments file {path} must hold a mapping of argument names to values, "
                         f"got {type(data).__name__}")
    return data


def _as_argv(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ClipTrainingArguments, bool]:
    """-> (model, data, training arguments, is_default_run). One .json/.yaml argument = an arguments file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ClipTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(ARGS_FILE_SUFFIXES):
        values = _read_args_file(Path(argv[0]))
        default_run = not values.get("train_file")
        return (*parser.parse_dict({**default_run_args(), **values} if default_run else values), default_run)
    default_run = not any(a == "--train_file" or a.startswith("--train_file=") for a in argv)
    # Defaults first: argparse keeps the last occurrence, so the user's own flags win.
    full = (_as_argv(default_run_args()) + list(argv)) if default_run else list(argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=full)
    return model_args, data_args, training_args, default_run


# --- model ------------------------------------------------------------------------------------------------------------
def build_model(args: ModelArguments):
    """(MiniClip, tokenizer) from scratch (--model_config) or from a checkpoint (--pretrained)."""
    import torch
    from miniclip.checkpoints import load_model_and_tokenizer
    from miniclip.config import ClipConfig, load_model_config
    from miniclip.model import LogitBias, MiniClip
    from miniclip.tokenizer import get_tokenizer
    siglip = args.loss == "siglip"
    bias = args.init_logit_bias if args.init_logit_bias is not None else (-10.0 if siglip else None)
    if args.pretrained is not None:
        model, tokenizer = load_model_and_tokenizer(args.pretrained, config=args.model_config,
                                                    format=args.pretrained_format, image_size=args.image_size,
                                                    context_length=args.context_length)
        model.train()
        if args.init_logit_scale is not None:
            with torch.no_grad():
                model.logit_scale.logit_scale.fill_(args.init_logit_scale)
        if bias is not None and (model.logit_bias is None or args.init_logit_bias is not None):
            model.logit_bias = LogitBias(bias)
            model.config.init_logit_bias = bias  # saved with the model, so from_pretrained rebuilds it
    else:
        data = load_model_config(args.model_config).to_dict()
        if args.image_size is not None:
            data["vision_cfg"]["image_size"] = args.image_size
        if args.context_length is not None:
            data["text_cfg"]["context_length"] = args.context_length
        if args.init_logit_scale is not None:
            data["init_logit_scale"] = args.init_logit_scale
        elif siglip:
            data["init_logit_scale"] = math.log(10)  # SigLIP's initial temperature and bias: ln 10, -10
        if bias is not None:
            data["init_logit_bias"] = bias
        config = ClipConfig.from_dict(data, where=f"model config {args.model_config}")  # validated again
        model, tokenizer = MiniClip(config), get_tokenizer(config)
    model.logit_scale.logit_scale.requires_grad_(args.learn_logit_scale)
    apply_locks(model, args)
    return model, tokenizer


def apply_locks(model, args: ModelArguments) -> None:
    """LiT-style locking. BatchNorm statistics are frozen by the trainer (eval mode for fully locked BatchNorm
    layers), not by swapping in FrozenBatchNorm2d, so the state dict keeps its keys and the layers can unlock."""
    if args.lock_image:
        if model.config.vision_cfg.is_resnet and args.lock_image_unlocked_groups:
            raise ValueError("--lock_image_unlocked_groups is not supported for a ResNet image tower (open_clip "
                             "locks a ModifiedResNet whole). Fix: use 0, or a ViT config")
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups, freeze_bn_stats=False)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s parameters, %s trainable", f"{model.num_parameters():,}", f"{trainable:,}")


# --- data -------------------------------------------------------------------------------------------------------------
def _readable(records: list[CaptionRecord], on_bad: str, path: str) -> list[CaptionRecord]:
    """Evaluation records whose image decodes; with on_bad='error' the first bad one raises (file and entry)."""
    from miniclip.data import ImageDecodeError, load_image
    kept = []
    for index, record in enumerate(records):
        try:
            load_image(record.image, draft_size=64)
            kept.append(record)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
            if on_bad == "error":
                raise ImageDecodeError(f"{path}: entry {index} (image {record.image}) cannot be decoded: "
                                       f"{type(e).__name__}: {e}. Fix the file, or pass --on_bad skip") from None
            logger.warning("%s: skipping entry %d: image %s cannot be decoded", path, index, record.image)
    if len(kept) < len(records):
        logger.warning("%s: skipped %d unreadable image(s) of %d", path, len(records) - len(kept), len(records))
    return kept


def read_eval_records(path: str | None, data_args: DataArguments, limit: int | None) -> list[CaptionRecord] | None:
    if path is None:
        return None
    records = read_caption_file(path, image_root=data_args.image_root, on_bad=data_args.on_bad)
    return _readable(records[:limit] if limit else records, data_args.on_bad, path)


def default_run_data(data_args: DataArguments) -> None:
    """The embedded default run: point the data arguments at the synthetic set (generated once, then cached)."""
    from miniclip.synthetic import ensure_synthetic
    synthetic = ensure_synthetic(data_args.synthetic_dir)
    logger.info("default run: synthetic captioned shapes in %s", synthetic.root)
    data_args.train_file = str(synthetic.train_file)
    data_args.validation_file = data_args.validation_file or str(synthetic.validation_file)
    data_args.test_file = data_args.test_file or str(synthetic.test_file)


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: a folder, or 'latest' = the newest complete checkpoint-N in output_dir (None, with
    a log line, when there is none yet: a restarted job then simply starts)."""
    if value is None or value.lower() in ("", "none", "false"):
        return None
    if value.lower() in ("latest", "last", "true"):
        done = [p for p in Path(output_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / CHECKPOINT_DONE).is_file()]
        if not done:
            logger.warning("no complete checkpoint in %s yet: starting from the beginning", output_dir)
            return None
        return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
    if not (Path(value) / CHECKPOINT_DONE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint folder (no "
                                f"{CHECKPOINT_DONE}). Fix: pass a checkpoint-N folder, or 'latest'")
    return value


def _setup_logging(training_args: ClipTrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    # miniclip's own progress lines (skipped samples, unlocking, files written) on the main process
    logging.getLogger("miniclip").setLevel(logging.INFO if training_args.should_log else level)


def _report(name: str, metrics: dict) -> None:
    keys = [k for k in metrics if "_R@" in k or k.endswith(("mean_recall", "median_rank"))]
    logger.info("%s retrieval: %s", name, ", ".join(f"{k.split('_', 1)[1]} {metrics[k]:.2f}" for k in keys))


def main(argv: list[str] | None = None) -> RunResult:
    model_args, data_args, training_args, default_run = parse_args(sys.argv[1:] if argv is None else list(argv))
    training_args.remove_unused_columns = False  # the collator needs the raw "caption" column
    _setup_logging(training_args)
    set_seed(training_args.seed)
    if default_run:
        default_run_data(data_args)
        if training_args.use_cpu and training_args.dataloader_num_workers:
            import torch  # leave the decoding workers their cores: on 2 cores, 2 compute threads + 1 worker thrash
            torch.set_num_threads(max(1, torch.get_num_threads() - training_args.dataloader_num_workers))
    from miniclip.data import ClipCollator, EpochCallback, build_dataset
    from miniclip.transforms import image_transform

    # Caption files first: a bad file fails in a second, before any model is built.
    records = read_caption_file(data_args.train_file, image_root=data_args.image_root, on_bad=data_args.on_bad)
    eval_records = read_eval_records(data_args.validation_file, data_args, data_args.max_eval_samples)
    test_records = read_eval_records(data_args.test_file, data_args, None)
    model, tokenizer = build_model(model_args)
    image_size = model.config.vision_cfg.image_size
    train_dataset = build_dataset(records, model.config, train=data_args.augment, caption_mode=data_args.caption_mode,
                                  seed=training_args.seed, max_samples=data_args.max_train_samples,
                                  on_bad=data_args.on_bad, image_size=image_size)
    logger.info("%d training images (%d pairs per epoch), %s validation images", len(records), len(train_dataset),
                len(eval_records) if eval_records else "no")

    trainer = ClipTrainer(model, training_args, loss=model_args.loss, unlock_image_step=model_args.unlock_image_step,
                          freeze_bn_stats=model_args.lock_image_freeze_bn_stats, train_dataset=train_dataset,
                          eval_dataset=eval_records, data_collator=ClipCollator(tokenizer), processing_class=tokenizer,
                          eval_transform=image_transform(model.config, train=False, image_size=image_size),
                          callbacks=[EpochCallback(train_dataset)])
    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # miniclip folder in output_dir: MiniClip.from_pretrained(output_dir)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    eval_metrics = test_metrics = None
    if eval_records:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        _report("validation", eval_metrics)
    if test_records:
        test_metrics = trainer.evaluate(test_records, metric_key_prefix="test")
        trainer.save_metrics("test", test_metrics)
        _report("test", test_metrics)
    return RunResult(Path(training_args.output_dir), train_result.metrics, eval_metrics, test_metrics, trainer)


if __name__ == "__main__":
    main()
