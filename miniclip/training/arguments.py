"""The command-line arguments of a training run as typed dataclasses (`HfArgumentParser` reads them from flags or a
JSON / YAML file): `ModelArguments`, `DataArguments`, `ClipTrainingArguments` (TrainingArguments plus the
contrastive-batch options), the one default-run definition, and `parse_args`.

Leaves out on purpose: running anything (apps/train.py does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser, TrainingArguments

from miniclip.config import check_literal
from miniclip.data.captions import BadSamplePolicy, CaptionFileOptions
from miniclip.data.dataset import CaptionMode
from miniclip.distillation import DistillKind, FeatureDistance
from miniclip.evaluation.zeroshot import TemplateSet
from miniclip.files import MAPPING_SUFFIXES, read_mapping_file
from miniclip.loss import LossKind
from miniclip.training.locking import Locks

logger = logging.getLogger(__name__)


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
    distill_from: str | None = field(default=None, metadata={"help": (
        "Distil from this teacher checkpoint (any layout --pretrained reads; its own architecture, tokenizer and "
        "image size): frozen, eval mode, no gradients. The loss is set by --distill_loss and the weights.")})
    inherit_from: str | None = field(default=None, metadata={"help": (
        "Weight inheritance (TinyCLIP): build --model_config and copy into it the selected layers and leading "
        "channels / heads of this checkpoint (see miniclip.inherit); the report is logged.")})
    inherit_layers: str = field(default="uniform", metadata={"help": (
        "With --inherit_from: 'uniform' (evenly spread, first and last kept), or the teacher layer of each student "
        "layer as a comma list for both towers, e.g. '0,3'.")})
    inherit_width: str = field(default="first", metadata={"help": (
        "With --inherit_from: 'first' = a narrower student keeps the teacher's leading channels and heads.")})
    patch_dropout: float | None = field(default=None, metadata={"help": (
        "FLIP patch dropout (Li et al. 2023) on a ViT image tower: the fraction of patch tokens dropped at random in "
        "each training forward (class token kept; evaluation sees all), e.g. 0.5 for about 2x less image-tower "
        "compute. Default: the model config's (vision_cfg.patch_dropout, normally 0).")})

    def __post_init__(self):
        check_literal(self.loss, LossKind, "loss")
        if self.inherit_from is not None and (self.model_config is None or self.pretrained is not None):
            raise ValueError("--inherit_from needs --model_config (the student architecture) and no --pretrained")
        if self.model_config is None and self.pretrained is None:
            raise ValueError("give --model_config NAME (train from scratch) or --pretrained CHECKPOINT (finetune); "
                             "see miniclip.list_model_configs() for the names")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        if self.patch_dropout is not None and not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"--patch_dropout={self.patch_dropout} must be in [0, 1) (0 = off)")
        if self.unlock_image_step is not None:
            if self.unlock_image_step < 1:
                raise ValueError(f"--unlock_image_step={self.unlock_image_step} must be >= 1 (an optimizer step)")
            self.lock_image = True  # stage 1 is a locked image tower

    def locks(self) -> Locks:
        """What ClipTrainer locks (training/locking.py)."""
        return Locks(image=self.lock_image, image_unlocked_groups=self.lock_image_unlocked_groups,
                     text=self.lock_text, text_unlocked_layers=self.lock_text_unlocked_layers,
                     unlock_image_step=self.unlock_image_step, freeze_bn_stats=self.lock_image_freeze_bn_stats)


@dataclass
class DataArguments(CaptionFileOptions):
    train_file: str | None = field(default=None, metadata={"help": (
        'Training captions: a JSON list [{"image": "images/x.jpg", "caption": ["...", ...]}], JSON Lines, or CSV '
        "with image / caption columns. Without it: the embedded default run on a synthetic set.")})
    validation_file: str | None = field(default=None, metadata={"help": (
        "Validation captions (same formats): retrieval recall during training (eval_strategy) and at the end.")})
    test_file: str | None = field(default=None, metadata={"help": "Captions evaluated once, after training."})
    image_root: str | None = field(default=None, metadata={"help": (
        "Folder relative image paths are relative to (default: the folder of each caption file).")})
    caption_mode: CaptionMode = field(default="random", metadata={"help": (
        "'random': one caption per image per epoch, picked from (seed, epoch, index), so resumes reproduce it; "
        "'all': every caption is its own training pair.")})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    on_bad: BadSamplePolicy = field(default="error", metadata={"help": (
        "Bad samples (missing / corrupt image, empty captions, path outside a confined root): 'error' stops with the "
        "file and entry; 'skip' drops them and counts them in the log.")})
    augment: bool = field(default=True, metadata={"help": (
        "Random resized crop (scale 0.9-1) on training images; false = the evaluation transform.")})
    synthetic_dir: str | None = field(default=None, metadata={"help": (
        "Default run only: where the synthetic set is cached (default $MINICLIP_CACHE/synthetic or "
        "~/.cache/miniclip/synthetic).")})
    streaming: bool = field(default=False, metadata={"help": (
        "Read --train_file shards (webdataset .tar with brace patterns, .parquet / .arrow files, a save_to_disk "
        "folder) as a stream: nothing read in full, no file checked at start, split by node and worker. Needs "
        "--max_steps (a stream has no length). Write shards with python -m miniclip.apps.shard.")})
    shuffle_buffer: int = field(default=1000, metadata={"help": (
        "--streaming: samples in the shuffle buffer (shards are shuffled per pass too). 0 = shard order only; "
        "then a resumed run continues exactly (datasets does not save the buffer's content, so with a buffer "
        "the samples it held at the checkpoint are not seen in that pass).")})
    zeroshot_dir: str | None = field(default=None, metadata={"help": (
        "Image folder with one subfolder per class (as test.py --zeroshot_dir): zero-shot accuracy at every "
        "evaluation, logged as eval_zeroshot_top1 / eval_zeroshot_top5 (usable as --metric_for_best_model "
        "zeroshot_top1), plotted in zeroshot_curves.png. Shows what a finetune forgets.")})
    zeroshot_class_map: str | None = field(default=None, metadata={"help": (
        'JSON {"folder": "class name"} for the zero-shot prompts (default: folder names, _ as spaces).')})
    zeroshot_templates: TemplateSet = field(default="auto", metadata={"help": (
        "Zero-shot prompt templates: auto (Chinese for a BERT text tower, else CLIP's 80 English), english, "
        "chinese, simple.")})
    zeroshot_per_class: int | None = field(default=None, metadata={"help": (
        "Use only the first N images of each zero-shot class (a cheaper evaluation during training).")})
    heldout_file: str | None = field(default=None, metadata={"help": (
        "A second caption file evaluated at every evaluation beside --validation_file, logged as eval_heldout_* "
        "(e.g. the domain a pretrained model knew, while --validation_file is the finetuning domain); "
        "--max_eval_samples applies to it too.")})

    def __post_init__(self):
        check_literal(self.caption_mode, CaptionMode, "caption_mode")
        check_literal(self.on_bad, BadSamplePolicy, "on_bad")
        if self.shuffle_buffer < 0:
            raise ValueError(f"--shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 = no buffer)")
        check_literal(self.zeroshot_templates, TemplateSet, "zeroshot_templates")
        for name in ("max_train_samples", "max_eval_samples", "zeroshot_per_class"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name}={getattr(self, name)} must be a positive number of images")


# The embedded default run (no --train_file): what it sets unless the command line / args file says otherwise.
# Tuned on a 2-core CPU: model_configs/tiny-default.json (tiny-vit with 8-pixel patches: 64 tokens an image), 20
# epochs of 24 steps at batch 128, AdamW at 3e-3 with cosine decay; one dataloader worker decodes while the main
# process computes on the other core. The data comes from data/synthetic.py.
DEFAULT_RUN: dict = {
    "model_config": "tiny-default", "output_dir": "output/default", "caption_mode": "random",
    "per_device_train_batch_size": 128, "per_device_eval_batch_size": 128, "num_train_epochs": 20,
    "learning_rate": 3e-3, "weight_decay": 0.1, "warmup_steps": 50, "lr_scheduler_type": "cosine",
    "logging_steps": 20, "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "use_cpu": True,
    "bf16": True, "seed": 0, "dataloader_num_workers": 1, "dataloader_persistent_workers": True,
}


@dataclass
class ClipTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the contrastive-batch options of `ClipTrainer`."""
    feature_accum_steps: int = field(default=1, metadata={"help": (
        "Cached-feature gradient accumulation (open_clip's accum_freq): each optimizer step takes this many "
        "micro-batches of per_device_train_batch_size, computes all their features without gradients, then "
        "recomputes each micro-batch with gradients against the cached others, so every sample meets the negatives "
        "of the whole accumulated batch (unlike gradient_accumulation_steps, whose micro-batches only see their own "
        "negatives). Costs one extra forward pass. 1 = off.")})
    local_loss: bool = field(default=False, metadata={"help": (
        "With several processes, score only this process's rows against all gathered columns (open_clip's local "
        "loss): less logit memory, same gradient.")})
    gather_with_grad: bool = field(default=True, metadata={"help": (
        "Gather features from all processes with gradients (exact). False saves memory but drops the gradient "
        "through other processes' copies of the features.")})
    # Two stock defaults changed because each costs a host sync on every GPU step (the CPU waits for the GPU, then
    # the GPU waits for the CPU's next launches): the Trainer's NaN filter reads the loss on the host
    # (`bool(torch.isnan(loss))`), and accelerate's blocking batch copy waits for the stream. ClipTrainer stops on
    # a NaN loss anyway (NonFiniteLossCallback), so the filter has nothing left to do.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": (
        "Replace NaN / inf losses in the logs by the recent mean (the stock default; costs a host sync per step). "
        "Off by default: ClipTrainer stops the run on a non-finite loss instead.")})
    non_blocking_transfers: bool = field(default=True, metadata={"help": (
        "Copy each batch to the GPU asynchronously from pinned memory (accelerate's non_blocking; needs "
        "dataloader_pin_memory). False = accelerate's blocking copy, which syncs once per step.")})
    keep_freed_memory: bool = field(default=True, metadata={"help": (
        "On Linux (glibc), keep freed memory in the process's heap instead of returning it to the kernel, so each "
        "step's tensors do not come back as fresh pages to fault in (1.2x a CPU step: docs/throughput_and_memory.md). "
        "Process-wide; the resident memory then stays at its peak. False = glibc's defaults.")})

    distill_loss: DistillKind = field(default="affinity", metadata={"help": (
        "With --distill_from: 'affinity' (TinyCLIP's affinity mimicking: KL of the similarity rows, both "
        "directions), 'kd' (open_clip's DistillClipLoss: cross-entropy against the teacher's probabilities) or "
        "'feature' (cosine / MSE between embeddings, through a learnt projection when the dims differ).")})
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term."})
    contrastive_weight: float = field(default=1.0, metadata={"help": (
        "Weight of the contrastive loss when distilling (0 = distillation only).")})
    distill_feature_distance: FeatureDistance = field(default="cosine", metadata={"help": (
        "--distill_loss feature: 'cosine' (1 - cos) or 'mse'.")})

    image_layer_decay: float = field(default=1.0, metadata={"help": (
        "Layer-wise lr decay of the image tower (BEiT-style): block i of L trains at lr * decay^(L + 1 - i), the "
        "patch / position embeddings at lr * decay^(L + 1), the final norm and projection at lr. 1 = off; "
        "0.65-0.85 is usual when finetuning a pretrained model. The groups are logged at the start.")})
    text_layer_decay: float = field(default=1.0, metadata={"help": (
        "Layer-wise lr decay of the text tower (token / position embeddings deepest, projection at the full lr).")})

    def __post_init__(self):
        if (self.bf16 or self.fp16) and not self.use_cpu and not _has_accelerator():
            # transformers would stop with "Your setup doesn't support bf16/gpu": mixed precision on the CPU it is.
            # fp16 there would silently be fp32 (accelerate has no CPU fp16 autocast or GradScaler): bf16 instead.
            logger.warning("--%s without a GPU: training on the CPU (use_cpu=True)%s", "bf16" if self.bf16 else "fp16",
                           "" if self.bf16 else " in bf16, the CPU's mixed precision")
            self.use_cpu, self.bf16, self.fp16 = True, True, False
        super().__post_init__()
        check_literal(self.distill_loss, DistillKind, "distill_loss")
        check_literal(self.distill_feature_distance, FeatureDistance, "distill_feature_distance")
        if self.distill_weight < 0 or self.contrastive_weight < 0:
            raise ValueError(f"distill_weight={self.distill_weight} / contrastive_weight={self.contrastive_weight} "
                             "must be >= 0")
        if self.feature_accum_steps < 1:
            raise ValueError(f"feature_accum_steps={self.feature_accum_steps} must be >= 1 (1 = off)")
        if self.non_blocking_transfers and self.dataloader_pin_memory and hasattr(self.accelerator_config,
                                                                                  "non_blocking"):
            self.accelerator_config.non_blocking = True
        for name in ("image_layer_decay", "text_layer_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"--{name}={getattr(self, name)} must be in (0, 1] (1 = off)")


def _has_accelerator() -> bool:
    """A device transformers runs mixed precision on besides the CPU (CUDA / ROCm, Apple MPS, Intel XPU)."""
    import torch
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or bool(xpu is not None and xpu.is_available()))


def as_argv(values: dict) -> list[str]:
    """{"learning_rate": 1e-3} -> ["--learning_rate", "0.001"]: a mapping as command-line flags."""
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def is_args_file(argv: list[str]) -> bool:
    """A single .json / .yaml / .yml argument is an arguments file (transformers' run_clip convention)."""
    return len(argv) == 1 and argv[0].endswith(MAPPING_SUFFIXES) and not argv[0].startswith("-")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, ClipTrainingArguments, bool]:
    """-> (model, data, training arguments, is_default_run). Flags, one arguments file, or the file then flags that
    override it. Without --train_file
    the run is the embedded default run: DEFAULT_RUN first, the user's own values on top."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ClipTrainingArguments))
    values = read_mapping_file(argv[0], "arguments file") if is_args_file(argv) else None
    if values is not None:
        default_run = not values.get("train_file") and not values.get("pretrained")
        return (*parser.parse_dict({**DEFAULT_RUN, **values} if default_run else values), default_run)
    if argv and is_args_file(argv[:1]):  # `train.py args.yaml --resume_from_checkpoint latest`: flags on top
        values = read_mapping_file(argv[0], "arguments file")
        known = {f.name for cls in (ModelArguments, DataArguments, ClipTrainingArguments) for f in fields(cls)}
        if set(values) - known:
            raise ValueError(f"arguments file {argv[0]}: unknown key(s) {sorted(set(values) - known)}")
        flags = {a.split("=")[0] for a in argv[1:] if a.startswith("--")}
        default_run = not ({"--train_file", "--pretrained"} & flags or values.get("train_file")
                           or values.get("pretrained"))
        # DEFAULT_RUN (default run only) < the file < the flags after it
        parser.set_defaults(**({**DEFAULT_RUN, **values} if default_run else values))
        return (*parser.parse_args_into_dataclasses(args=argv[1:]), default_run)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    default_run = "--train_file" not in given and "--pretrained" not in given
    # Defaults first: argparse keeps the last occurrence, so the user's own flags win.
    full = (as_argv(DEFAULT_RUN) + list(argv)) if default_run else list(argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=full)
    return model_args, data_args, training_args, default_run
