"""A training run from the command line: `python train.py ...` and the `miniclip-train` console script.

Arguments (training/arguments.py) -> caption files -> model (from scratch or a checkpoint) -> `ClipTrainer` -> a
miniclip folder in output_dir, curves, and retrieval on the validation / test files. Leaves out on purpose: anything a
`TrainingArguments` flag already does (precision, schedules, logging integrations, checkpoint rotation).
"""
from __future__ import annotations

import logging
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import set_seed

from miniclip.apps.cli import run_cli
from miniclip.checkpoints import load_model_and_tokenizer, load_pretrained
from miniclip.checkpoints.inherit import inherit
from miniclip.config import ClipConfig, load_model_config
from miniclip.data.captions import CaptionRecord, read_caption_file
from miniclip.data.dataset import ClipCollator, EpochCallback, build_dataset
from miniclip.data.streaming import (STREAM_STATE, StreamStateCallback, build_stream, extract_records,
                                     stream_source)
from miniclip.data.synthetic import ensure_synthetic
from miniclip.distributed import from_main_process
from miniclip.evaluation.metrics import is_retrieval_metric
from miniclip.evaluation.zeroshot import limit_per_class, read_image_folder
from miniclip.model import LogitBias, MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.arguments import ClipTrainingArguments, DataArguments, ModelArguments, parse_args
from miniclip.training.trainer import ClipTrainer
from miniclip.transforms import ImageDecodeError, image_transform, load_image

logger = logging.getLogger("miniclip.train")
CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last: a checkpoint folder without it is incomplete


@dataclass
class RunResult:
    """What `main` did: the output folder, Trainer metrics, and retrieval metrics (None when not evaluated)."""
    output_dir: Path
    train_metrics: dict
    eval_metrics: dict | None
    test_metrics: dict | None
    trainer: ClipTrainer


# --- model ------------------------------------------------------------------------------------------------------------
def build_model(args: ModelArguments):
    """(MiniClip, tokenizer) from scratch (--model_config) or from a checkpoint (--pretrained)."""
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
        if args.inherit_from is not None:
            model = inherit_weights(args, config)
            tokenizer = get_tokenizer(config, checkpoint_dir=model.load_info.directory)
    model.logit_scale.logit_scale.requires_grad_(args.learn_logit_scale)
    if args.patch_dropout is not None:
        model.set_patch_dropout(args.patch_dropout)
    return model, tokenizer


def inherit_weights(args: ModelArguments, config: ClipConfig) -> MiniClip:
    """--inherit_from: the student `config` built from the selected layers / leading channels of a checkpoint."""
    source = load_pretrained(args.inherit_from)
    layers = args.inherit_layers
    if layers != "uniform":
        try:
            layers = [int(i) for i in layers.split(",")]
        except ValueError:
            raise ValueError(f"--inherit_layers={args.inherit_layers!r}: give 'uniform' or comma-separated teacher "
                             "layer indices, e.g. 0,3") from None
    model, report = inherit(source, config, layers=layers, width=args.inherit_width)
    model.load_info = source.load_info  # where the weights (and a BERT vocab) came from
    logger.info("inherited from %s: %s", args.inherit_from, report.summary())
    logger.debug("weight inheritance, tensor by tensor:\n%s", report.table())
    model.train()
    return model


def build_teacher(args: ModelArguments):
    """--distill_from: (teacher, its tokenizer), frozen in eval mode; (None, None) without it."""
    if args.distill_from is None:
        return None, None
    teacher, tokenizer = load_model_and_tokenizer(args.distill_from)
    logger.info("distilling from %s (%s parameters, image size %d, %s text tower)", args.distill_from,
                f"{teacher.num_parameters():,}", teacher.config.vision_cfg.image_size, teacher.config.text_cfg.tower)
    return teacher.eval().requires_grad_(False), tokenizer


# --- data -------------------------------------------------------------------------------------------------------------
def _readable(records: list[CaptionRecord], on_bad: str, path: str) -> list[CaptionRecord]:
    """Evaluation records whose image decodes; with on_bad='error' the first bad one raises (file and entry)."""
    kept = []
    for index, record in enumerate(records):
        try:
            load_image(record.image, draft_size=64)
            kept.append(record)
        except ImageDecodeError as e:
            if on_bad == "error":
                raise ImageDecodeError(f"{path}: entry {index} (image {record.image}) cannot be decoded: {e.reason}. "
                                       "Fix the file, or pass --on_bad skip", e.reason) from None
            logger.warning("%s: skipping entry %d: image %s cannot be decoded", path, index, record.image)
    if len(kept) < len(records):
        logger.warning("%s: skipped %d unreadable image(s) of %d", path, len(records) - len(kept), len(records))
    return kept


def read_eval_records(path: str | None, data_args: DataArguments, limit: int | None,
                      output_dir: str = ".") -> list[CaptionRecord] | None:
    """A caption file's records, or a shard source's first `limit` samples extracted to output_dir/eval_images."""
    if path is None:
        return None
    if stream_source(path) is not None:
        folder = Path(output_dir) / "eval_images" / f"{zlib.crc32(str(Path(path).resolve()).encode()):08x}"
        return extract_records(path, folder, limit, on_bad=data_args.on_bad)
    records = read_caption_file(path, image_root=data_args.image_root, on_bad=data_args.on_bad,
                                **data_args.caption_file_kwargs())
    return _readable(records[:limit] if limit else records, data_args.on_bad, path)


def default_run_data(data_args: DataArguments) -> None:
    """The embedded default run: point the data arguments at the synthetic set (generated once, then cached)."""
    synthetic = ensure_synthetic(data_args.synthetic_dir)
    logger.info("default run: synthetic captioned shapes in %s", synthetic.root)
    data_args.train_file = str(synthetic.train_file)
    data_args.validation_file = data_args.validation_file or str(synthetic.validation_file)
    data_args.test_file = data_args.test_file or str(synthetic.test_file)


def resolve_checkpoint(value: str | None, output_dir: str, required: tuple[str, ...] = ()) -> str | None:
    """--resume_from_checkpoint: a folder, or 'latest' = the newest complete checkpoint-N in output_dir (None, with
    a log line, when there is none yet: a restarted job then simply starts). Complete: it has CHECKPOINT_DONE and
    every file in `required` (a streamed run's stream state is written after the Trainer's files)."""
    if value is None or value.lower() in ("", "none", "false"):
        return None
    needed = (CHECKPOINT_DONE, *required)
    if value.lower() in ("latest", "last", "true"):
        done = [p for p in Path(output_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and all((p / name).is_file() for name in needed)]
        if not done:
            logger.warning("no complete checkpoint in %s yet: starting from the beginning", output_dir)
            return None
        return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
    for name in needed:
        if not (Path(value) / name).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint folder (no "
                                    f"{name}). Fix: pass a checkpoint-N folder, or 'latest'")
    return value


def resolve_checkpoint_on_main(value: str | None, output_dir: str, required: tuple[str, ...] = ()) -> str | None:
    """`resolve_checkpoint` on the main process, the answer sent to all: with several nodes, 'latest' would
    otherwise be each node's own newest folder, and nodes that disagree resume from different steps."""
    return from_main_process(lambda: resolve_checkpoint(value, output_dir, required))


def check_streaming(data_args: DataArguments, training_args: ClipTrainingArguments) -> bool:
    """Whether the training data is streamed; shards without --streaming, or a stream without --max_steps, are
    one-line errors. A streamed run resumes from the stream state saved in its checkpoint, so the Trainer's
    re-reading of the consumed batches (its data skip) is turned off."""
    if stream_source(data_args.train_file) is None:
        if data_args.streaming:
            raise ValueError(f"--streaming true reads shards; {data_args.train_file} is a caption file. Fix: write "
                             "shards with python -m miniclip.apps.shard, or leave --streaming off")
        return False
    if not data_args.streaming:
        raise ValueError(f"--train_file {data_args.train_file} names shards: pass --streaming true (shards are read "
                         "as a stream, not loaded in memory)")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("--streaming true needs --max_steps N: a stream has no length, so epochs cannot say when "
                         "to stop")
    if data_args.max_train_samples is not None:
        raise ValueError("--max_train_samples does not apply to a stream; limit the shards instead (a brace "
                         "pattern over fewer of them)")
    training_args.ignore_data_skip = True
    return True


def _setup_logging(training_args: ClipTrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    # miniclip's own progress lines (skipped samples, unlocking, files written) on the main process
    logging.getLogger("miniclip").setLevel(logging.INFO if training_args.should_log else level)


def _report(name: str, metrics: dict) -> None:
    keys = [k for k in metrics if is_retrieval_metric(k) or k.endswith(("zeroshot_top1", "zeroshot_top5"))]
    logger.info("%s: %s", name, ", ".join(f"{k.split('_', 1)[1]} {metrics[k]:.2f}" for k in keys))


def evaluation_data(data_args: DataArguments, output_dir: str):
    """(validation, test, held-out records, zero-shot folder): what evaluate() scores, each None when not given."""
    eval_records = read_eval_records(data_args.validation_file, data_args, data_args.max_eval_samples, output_dir)
    test_records = read_eval_records(data_args.test_file, data_args, None, output_dir)
    heldout_records = read_eval_records(data_args.heldout_file, data_args, data_args.max_eval_samples, output_dir)
    zeroshot_folder = None
    if data_args.zeroshot_dir is not None:
        zeroshot_folder = limit_per_class(read_image_folder(data_args.zeroshot_dir, data_args.zeroshot_class_map),
                                          data_args.zeroshot_per_class)
    return eval_records, test_records, heldout_records, zeroshot_folder


def train_data(data_args: DataArguments, training_args: ClipTrainingArguments, config, records, teacher, streamed: bool):
    """The training set: streamed shards (data/streaming.py) or the caption file's records (data/dataset.py)."""
    image_size = config.vision_cfg.image_size
    if streamed:
        return build_stream(data_args.train_file, config, train=data_args.augment, caption_mode=data_args.caption_mode,
                            seed=training_args.seed, shuffle_buffer=data_args.shuffle_buffer, on_bad=data_args.on_bad,
                            image_size=image_size)
    return build_dataset(records, config, train=data_args.augment, caption_mode=data_args.caption_mode,
                         seed=training_args.seed, max_samples=data_args.max_train_samples, on_bad=data_args.on_bad,
                         image_size=image_size, teacher_config=teacher.config if teacher is not None else None)


def main(argv: list[str] | None = None, callbacks=()) -> RunResult:
    """One training run from command-line style `argv`; `callbacks` (TrainerCallback) join the trainer's own."""
    model_args, data_args, training_args, default_run = parse_args(sys.argv[1:] if argv is None else list(argv))
    training_args.remove_unused_columns = False  # the collator needs the raw "caption" column
    _setup_logging(training_args)
    set_seed(training_args.seed)
    if default_run:
        default_run_data(data_args)
        if training_args.use_cpu and training_args.dataloader_num_workers:
            # leave the decoding workers their cores: on 2 cores, 2 compute threads + 1 worker thrash
            torch.set_num_threads(max(1, torch.get_num_threads() - training_args.dataloader_num_workers))
    if data_args.train_file is None:
        raise ValueError("--pretrained needs --train_file (the captions to finetune on); the embedded default run "
                         "trains from scratch on its synthetic set")
    streamed = check_streaming(data_args, training_args)
    # Caption files first: a bad file fails in a second, before any model is built.
    records = None if streamed else read_caption_file(data_args.train_file, image_root=data_args.image_root,
                                                      on_bad=data_args.on_bad, **data_args.caption_file_kwargs())
    eval_records, test_records, heldout_records, zeroshot_folder = evaluation_data(data_args, training_args.output_dir)
    model, tokenizer = build_model(model_args)
    teacher, teacher_tokenizer = build_teacher(model_args)
    image_size = model.config.vision_cfg.image_size
    train_dataset = train_data(data_args, training_args, model.config, records, teacher, streamed)
    logger.info("%s, %s validation images", f"streaming {data_args.train_file} ({train_dataset.n_shards} shards)"
                if streamed else f"{len(records)} training images ({len(train_dataset)} pairs per epoch)",
                len(eval_records) if eval_records else "no")
    if teacher_tokenizer is not None and (teacher_tokenizer.describe(), getattr(teacher_tokenizer, "vocab_file", None)) \
            == (tokenizer.describe(), getattr(tokenizer, "vocab_file", None)):
        teacher_tokenizer = None  # the same tokens: the teacher reads the student's input_ids
    trainer = ClipTrainer(model, training_args, loss=model_args.loss, locks=model_args.locks(), train_dataset=train_dataset,
                          eval_dataset=eval_records, data_collator=ClipCollator(tokenizer, teacher_tokenizer),
                          processing_class=tokenizer, teacher=teacher, callbacks=list(callbacks),
                          eval_transform=image_transform(model.config, train=False, image_size=image_size),
                          zeroshot_folder=zeroshot_folder, zeroshot_templates=data_args.zeroshot_templates,
                          extra_eval_datasets={"heldout": heldout_records} if heldout_records else None)
    resume = resolve_checkpoint_on_main(training_args.resume_from_checkpoint, training_args.output_dir,
                                        (STREAM_STATE,) if streamed else ())
    trainer.add_callback(StreamStateCallback(resume) if streamed else EpochCallback(train_dataset))
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # miniclip folder in output_dir: MiniClip.from_pretrained(output_dir)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    eval_metrics = test_metrics = None
    if eval_records or heldout_records or zeroshot_folder is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        _report("validation", eval_metrics)
    if test_records:
        test_metrics = trainer.evaluate(test_records, metric_key_prefix="test")
        trainer.save_metrics("test", test_metrics)
        _report("test", test_metrics)
    return RunResult(Path(training_args.output_dir), train_result.metrics, eval_metrics, test_metrics, trainer)


def cli(argv: list[str] | None = None) -> None:
    """The `miniclip-train` console script (and `python train.py`)."""
    run_cli(main, argv, prog="train.py")


if __name__ == "__main__":
    cli()
