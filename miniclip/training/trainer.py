"""`ClipTrainer`: the Hugging Face `Trainer` taught contrastive training. The loss comes from loss.py (global
negatives across processes), weight decay skips gains / biases / embeddings / temperature, locked BatchNorm keeps
its statistics, an optional cached-feature accumulation keeps negatives right over micro-batches, checkpoints are
miniclip folders, and `evaluate()` reports retrieval recall. Everything else (mixed precision, DDP, schedules,
checkpoint rotation, resume, logging integrations) is the stock Trainer.

Sharded models (FSDP through --fsdp): the wrap units come from MiniClip._no_split_modules, evaluation encodes
through the wrapped model's forward on every process, the temperature clamp acts on each process's shard, and
checkpoints are full miniclip folders. Leaves out on purpose: DeepSpeed specifics (the stock path; untested).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from miniclip.checkpoints.io import CheckpointError
from miniclip.checkpoints.saving import save_pretrained
from miniclip.config import check_literal
from miniclip.distillation import DistillationLoss
from miniclip.distributed import world_size
from miniclip.data.captions import CaptionRecord
from miniclip.data.streaming import StreamedPairs, stream_loader
from miniclip.evaluation.encode import Encoder, evaluate_retrieval
from miniclip.evaluation.zeroshot import ImageFolder, TemplateSet, evaluate_zeroshot, get_templates
from miniclip.files import atomic_write_text, save_safetensors
from miniclip.loss import LossKind, build_loss
from miniclip.model import scalar_keys
from miniclip.training.arguments import ClipTrainingArguments

__all__ = ["ClipTrainer", "ClipTrainingArguments", "NonFiniteLossError", "decay_parameter_names"]
from miniclip.training.callbacks import CurvesCallback, LogitScaleClampCallback, NonFiniteLossCallback
from miniclip.training.layer_decay import describe_groups, layer_decay_groups
from miniclip.training.locking import Locks, TwoStageCallback, apply_locks, frozen_batchnorms
from miniclip.training.throughput import ThroughputMeter, TrainingFlops, keep_freed_memory, peak_flops
from miniclip.transforms import image_transform

logger = logging.getLogger(__name__)
DISTILL_HEAD = "distill_projection.safetensors"  # the feature loss's learnt projection, beside the student

# Parameters named like this never decay, whatever their shape: decaying an embedding table or the temperature
# pulls them towards zero for no regularisation benefit (open_clip and Chinese-CLIP exclude them too).
NO_DECAY_NAMES = frozenset({"logit_scale", "logit_bias", "token_embedding", "positional_embedding", "class_embedding",
                            "word_embeddings", "position_embeddings", "token_type_embeddings",
                            "pos_embed", "cls_token", "dist_token", "reg_token"})  # timm's names (no_weight_decay())


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: matrices and conv kernels (ndim >= 2), except embeddings and
    the temperature. 1-D parameters (LayerNorm / BatchNorm gains, biases, the ViT class token) never decay."""
    return [name for name, p in model.named_parameters()
            if p.ndim >= 2 and not NO_DECAY_NAMES.intersection(name.split("."))]


def _scalar(value: torch.Tensor | None) -> torch.Tensor | None:
    """nn.DataParallel returns one copy of a scalar output per GPU: they are equal, their mean keeps all gradients."""
    return value.mean() if value is not None and value.ndim > 0 else value


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_records(records, what: str) -> None:
    if records is None:
        return
    groups = records.values() if isinstance(records, dict) else [records]
    for group in groups:
        if not isinstance(group, (list, tuple)) or not all(isinstance(r, CaptionRecord) for r in group):
            raise ValueError(f"{what} must be a list of CaptionRecord (or a dict of such lists) for retrieval "
                             f"evaluation, got {type(group).__name__}. Fix: pass "
                             "miniclip.data.captions.read_caption_file(validation_file)")


class ClipTrainer(Trainer):
    """`Trainer` for `MiniClip`. Extra arguments:

    loss: "clip" (symmetric cross-entropy) or "siglip" (sigmoid; the model needs a logit_bias).
    locks: what to lock (locking.Locks: LiT towers, the two-stage unlock step, frozen BatchNorm statistics),
        applied here once; towers the caller locked already stay locked.
    eval_dataset: a list of CaptionRecord (or a dict name -> list); `evaluate()` reports retrieval on them.
    eval_transform: image transform for evaluation (default: the model family's eval transform).
    zeroshot_folder: an evaluation.zeroshot.ImageFolder; the default evaluation adds zero-shot accuracy on it
        (templates: zeroshot_templates, "auto" = Chinese for a BERT text tower, else English).
    extra_eval_datasets: dict name -> list of CaptionRecord, also evaluated by the default evaluation (e.g. a
        held-out domain next to the target-domain eval_dataset).
    processing_class: the tokenizer (saved with every checkpoint, used by evaluation).
    teacher: a MiniClip to distil from (see distillation.py and `args.distill_loss`): frozen, in eval mode, run
        under no_grad in the run's precision on the inputs the collator prefixed `teacher_` (the student's where
        there are none). The loss becomes contrastive_weight * contrastive + distill_weight * distillation.
    """
    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the accumulation steps

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, *, loss: LossKind = "clip",
                 locks: Locks | None = None, eval_transform=None, teacher: nn.Module | None = None,
                 zeroshot_folder: ImageFolder | None = None, zeroshot_templates: TemplateSet = "auto",
                 extra_eval_datasets: dict | None = None, **kwargs):
        check_literal(loss, LossKind, "loss")
        check_literal(zeroshot_templates, TemplateSet, "zeroshot_templates")
        _check_records(extra_eval_datasets, "extra_eval_datasets")
        if kwargs.get("eval_dataset") is None and (zeroshot_folder is not None or extra_eval_datasets):
            kwargs["eval_dataset"] = {}  # no retrieval set of its own; the default evaluation still runs the others
        if loss == "siglip" and getattr(model, "logit_bias", None) is None:
            raise ValueError("loss='siglip' needs a model with a learnt logit_bias: set init_logit_bias in the model "
                             "config (SigLIP uses -10) or pass --init_logit_bias -10 to train.py")
        _check_records(kwargs.get("eval_dataset"), "eval_dataset")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        callbacks += [LogitScaleClampCallback(), NonFiniteLossCallback(self), CurvesCallback()]
        locks = locks or Locks()
        if locks.unlock_image_step is not None and args is not None and args.ddp_find_unused_parameters is False:
            raise ValueError("unlock_image_step needs ddp_find_unused_parameters (the locked image tower gets "
                             "no gradient in stage 1); leave it unset (MiniClip defaults to True) or set True")
        if getattr(args, "keep_freed_memory", True):
            keep_freed_memory()  # a process-wide allocator setting: no page faults for each step's tensors
        staged = apply_locks(model, locks)
        if staged:
            callbacks.append(TwoStageCallback(staged, locks.unlock_image_step, frozen_batchnorms(model.image_encoder)))
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self._first_nonfinite = None  # (step, loss) device tensors, see _note_nonfinite
        self.model_accepts_loss_kwargs = False  # MiniClip.forward takes **unused; no token-count normalisation
        self.loss_fn = build_loss(loss, local_loss=getattr(self.args, "local_loss", False),
                                  gather_with_grad=getattr(self.args, "gather_with_grad", True))
        self.locks = locks
        self.feature_accum_steps = getattr(self.args, "feature_accum_steps", 1)
        # The dataloader yields all micro-batches of one cached-feature step at once: k * per-device batch.
        self._train_batch_size *= self.feature_accum_steps
        self.eval_transform = eval_transform or image_transform(model.config, train=False)
        self.zeroshot_folder, self.zeroshot_templates = zeroshot_folder, zeroshot_templates
        self.extra_eval_datasets = dict(extra_eval_datasets or {})
        self._flops, self._throughput = None, ThroughputMeter()  # model FLOPs per step; samples/s and MFU logs
        if self.args.fp16 and self.accelerator.scaler is None and self.args.device.type == "cpu":
            raise ValueError("fp16=True on a CPU: accelerate then trains in fp32, without autocast or GradScaler. "
                             "Fix: use --bf16 on a CPU, or fp16 on a GPU.")
        self.teacher = self.distill_loss = None
        if teacher is not None:
            self._set_teacher(teacher)
        # Decay groups by name, from the model as built: under FSDP1 the parameters become flat shards (1-D) with
        # wrapper prefixes in their names, and an ndim rule read then would decay nothing.
        self._decay_names = set(decay_parameter_names(model))
        self._check_fsdp()

    def _check_fsdp(self) -> None:
        """--fsdp the engine did not turn on is an error, not a silent DDP run: accelerate enables FSDP only for
        multi-GPU / accelerator runs, and PyTorch's FSDP1 says "FSDP needs a non-CPU accelerator device"."""
        if getattr(self.args, "fsdp_plugin_args", None) is None:
            return
        if not self.is_fsdp_enabled:
            raise ValueError("--fsdp was given but accelerate did not enable FSDP (it does so only for runs on "
                             "several GPUs / accelerators; on CPU, PyTorch's FSDP1 stops with 'FSDP needs a non-CPU "
                             "accelerator device'). Fix: run on GPUs with torchrun / accelerate launch, or drop --fsdp")
        plugin = self.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
            raise ValueError("FSDP1 with use_orig_params false hides the original parameters, which the decay "
                             "groups and the logit-scale clamp use. Fix: --fsdp_config '{\"use_orig_params\": true}' "
                             "(the default), or FSDP2 (--fsdp_config '{\"version\": 2}')")

    # --- distillation -------------------------------------------------------------------------------------------------
    def _set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distill_loss = DistillationLoss(
            getattr(self.args, "distill_loss", "affinity"), self.model.config.embed_dim, teacher.config.embed_dim,
            getattr(self.args, "distill_feature_distance", "cosine"), local_loss=getattr(self.args, "local_loss", False),
            gather_with_grad=getattr(self.args, "gather_with_grad", True)).to(self.args.device)

    def _teacher_outputs(self, inputs: dict):
        """The teacher's embeddings of the batch: its own `teacher_*` inputs where the collator made them."""
        own = {k.removeprefix("teacher_"): v for k, v in inputs.items() if k.startswith("teacher_")}
        student = {k: v for k, v in inputs.items() if not k.startswith("teacher_")}
        if "input_ids" in own:  # the teacher's tokenizer: its own mask too, never the student's
            student.pop("attention_mask", None)
        with torch.no_grad():
            return self.teacher(**{**student, **own})

    def _weighted(self, contrastive: torch.Tensor | None, distill: torch.Tensor) -> torch.Tensor:
        loss = getattr(self.args, "distill_weight", 1.0) * distill
        return loss if contrastive is None else loss + getattr(self.args, "contrastive_weight", 1.0) * contrastive

    def _average_projection_grads(self) -> None:
        """The feature loss's projection lives outside the DDP-wrapped student: average its gradient over processes
        here, after backward (a per-sample mean on each process, so the average is the global batch's gradient)."""
        if self.distill_loss is None or self.distill_loss.projection is None or world_size() == 1:
            return
        for p in self.distill_loss.projection.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size()

    # --- loss ---------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: v for k, v in inputs.items() if not k.startswith("teacher_")})
        contrastive = None
        if self.teacher is None or getattr(self.args, "contrastive_weight", 1.0) > 0:
            contrastive = self.loss_fn(outputs.image_embeds, outputs.text_embeds, _scalar(outputs.logit_scale),
                                       _scalar(outputs.logit_bias))
        if self.teacher is None:
            return (contrastive, outputs) if return_outputs else contrastive
        teacher = self._teacher_outputs(inputs)
        distill = self.distill_loss(outputs.image_embeds, outputs.text_embeds, _scalar(outputs.logit_scale),
                                    teacher.image_embeds, teacher.text_embeds, teacher.logit_scale)
        loss = self._weighted(contrastive, distill)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.feature_accum_steps > 1:
            loss = self._cached_feature_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._average_projection_grads()
        self._note_nonfinite(loss)
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is NaN / inf, as device tensors: no host sync on the hot path.
        `raise_if_nonfinite` (run by NonFiniteLossCallback whenever the Trainer logs, saves, evaluates or stops)
        reads it, so a diverged run stops before its weights are saved and the message still names the step."""
        loss = loss.detach().float()
        if self._first_nonfinite is None:
            self._first_nonfinite = (torch.full((), -1, device=loss.device), torch.zeros((), device=loss.device))
        step, value = self._first_nonfinite
        new = ~torch.isfinite(loss) & (step < 0)
        self._first_nonfinite = (torch.where(new, self.state.global_step + 1, step), torch.where(new, loss, value))

    def raise_if_nonfinite(self) -> None:
        if self._first_nonfinite is None:
            return
        found = torch.stack([v.float() for v in self._first_nonfinite]).reshape(1, 2)  # (1, 2): step, loss
        if self.accelerator.num_processes > 1:  # every process stops together, not one while the others wait
            found = self.accelerator.gather(found)  # (W, 2)
        bad = found[found[:, 0] >= 0]
        if len(bad):
            step, value = bad[bad[:, 0].argmin()].tolist()
            raise NonFiniteLossError(
                f"the training loss is {value} at step {int(step)}; training stopped instead of diverging "
                "silently. Fix: lower the learning_rate or raise warmup_steps, set max_grad_norm, use bf16 rather "
                "than fp16, and check the data around this step.")

    def _cached_feature_step(self, model, inputs) -> torch.Tensor:
        """open_clip's --accum-freq (in the spirit of GradCache, Gao et al. 2021): features of all k micro-batches
        without autograd, then each micro-batch again with autograd, its fresh features spliced among the cached
        ones. The gradients sum to exactly those of one k-times larger batch: each pass gives the full-batch gradient
        through its own micro-batch, and the temperature (which every pass sees) keeps its gradient in the last pass
        only. BatchNorm in train mode sees micro-batch statistics (and updates its running ones twice per step):
        exact for ViTs, LayerNorm towers and frozen BatchNorm.
        The RNG state is replayed per micro-batch so dropout masks match between the two passes."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        n = min(self.feature_accum_steps, len(inputs["pixel_values"]))
        chunks = [dict(zip(inputs, parts)) for parts in zip(*(torch.tensor_split(v, n) for v in inputs.values()))]
        states, images, texts, teacher = [], [], [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk in chunks:
                states.append(_rng_state())
                out = model(**{k: v for k, v in chunk.items() if not k.startswith("teacher_")})
                images.append(out.image_embeds)  # (b, D)
                texts.append(out.text_embeds)  # (b, D)
                if self.teacher is not None:  # the teacher's features are cached too: it runs once per sample
                    teacher.append(self._teacher_outputs(chunk))
        after = _rng_state()
        shares = []  # per-sample terms: each pass's own share of the batch mean (see _accumulated_loss)
        for j, chunk in enumerate(chunks):
            _set_rng_state(states[j])
            last = j == n - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    out = model(**{k: v for k, v in chunk.items() if not k.startswith("teacher_")})
                    scale, bias = _scalar(out.logit_scale), _scalar(out.logit_bias)
                    if not last:
                        scale, bias = scale.detach(), bias.detach() if bias is not None else None
                    all_images = torch.cat(images[:j] + [out.image_embeds] + images[j + 1:])  # (k*b, D)
                    all_texts = torch.cat(texts[:j] + [out.text_embeds] + texts[j + 1:])  # (k*b, D)
                    loss, share = self._accumulated_loss(all_images, all_texts, scale, bias, out, teacher, j)
                    shares.append(share)
                loss = loss / self.current_gradient_accumulation_steps
                self.accelerator.backward(loss)
        _set_rng_state(after)
        self._average_projection_grads()
        # the batch-level terms are the same in every pass; the per-sample shares add up to their batch mean
        return loss.detach() + (sum(shares) - shares[-1]) / self.current_gradient_accumulation_steps

    def _accumulated_loss(self, images, texts, scale, bias, out, teacher: list, j: int):
        """One pass of the cached-feature step -> (loss to backpropagate, the detached part of it that is this
        micro-batch's own share rather than the same in every pass). Batch-level terms (contrastive, affinity, kd)
        see the whole spliced batch; the feature term is a per-sample mean, so each pass adds its own micro-batch's
        share (b / (k*b)) and nothing else: the shared projection then gets each sample's gradient once."""
        contrastive = self.loss_fn(images, texts, scale, bias) \
            if self.teacher is None or getattr(self.args, "contrastive_weight", 1.0) > 0 else None
        if self.teacher is None:
            return contrastive, 0.0
        if self.distill_loss.kind == "feature":
            distill = len(out.image_embeds) / len(images) * self.distill_loss.feature_term(
                out.image_embeds, out.text_embeds, teacher[j].image_embeds, teacher[j].text_embeds)
            return self._weighted(contrastive, distill), getattr(self.args, "distill_weight", 1.0) * distill.detach()
        distill = self.distill_loss(images, texts, scale, torch.cat([t.image_embeds for t in teacher]),
                                    torch.cat([t.text_embeds for t in teacher]), teacher[0].logit_scale)
        return self._weighted(contrastive, distill), 0.0

    def floating_point_ops(self, inputs) -> int:
        """Model FLOPs (forward + backward) of this micro-batch, counted by throughput.TrainingFlops instead of
        the Trainer's 6 * tokens * parameters rule for language models. The Trainer sums them into `total_flos`."""
        if self._flops is None:
            self._flops = TrainingFlops(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        if not self._flops:
            return 0
        pixel_values, input_ids = inputs.get("pixel_values"), inputs.get("input_ids")
        try:
            per_sample = self._flops(tuple(pixel_values.shape[1:]) if pixel_values is not None else None,
                                     input_ids.shape[1] if input_ids is not None else None)
        except Exception as e:  # a tower FlopCounterMode cannot run on a copy: say so once, count nothing
            logger.warning("model FLOPs are not counted for this model (total_flos stays 0, no MFU): %r", e)
            self._flops = False
            return 0
        return per_sample * len(pixel_values if pixel_values is not None else input_ids)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also get samples_per_second, model_tflops_per_second and, when the device's peak is known
        (throughput.peak_flops), mfu, each over the interval since the previous training log."""
        if "loss" in logs:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            peak = peak_flops(self.args.device, dtype)
            samples = self._train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            logs.update(self._throughput.measure(self.state.total_flos, self.state.global_step, samples,
                                                 peak * self.args.world_size if peak else None, start_time))
        super().log(logs, start_time)

    # --- data ---------------------------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        """Streamed data (data/streaming.py) gets its own loader: split by node here, by worker by `datasets`, and
        not through accelerate's prepare, which would shard an IterableDataset a second time (or, by default,
        read it all on rank 0 and dispatch it). `_prepare_inputs` moves the batches to the device as usual."""
        if isinstance(self.train_dataset, StreamedPairs):
            return stream_loader(self.train_dataset, self._train_batch_size, self.data_collator, self.args)
        return super().get_train_dataloader()

    # --- optimizer ----------------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if _unwrapped_name(name) in self._decay_names]

    def create_optimizer(self, model=None):
        """Two parameter groups (decay / no decay) over the parameters that require grad, which includes the ones a
        two-stage run unlocks later (see TwoStageCallback)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict")):
            return super().create_optimizer(model)  # GaLore / LOMO / layer-wise optimizers build their own groups
        decay = set(self.get_decay_parameter_names(opt_model))
        image_decay = getattr(self.args, "image_layer_decay", 1.0)
        text_decay = getattr(self.args, "text_layer_decay", 1.0)
        if image_decay != 1.0 or text_decay != 1.0:
            groups = layer_decay_groups(opt_model, self.args.learning_rate, self.args.weight_decay, decay,
                                        image_decay, text_decay)
            if self.is_world_process_zero():
                logger.info("layer-wise lr decay (image %g, text %g), optimizer groups:\n%s", image_decay,
                            text_decay, describe_groups(groups))
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        if self.distill_loss is not None:  # the feature loss's projection trains with the student (and decays)
            trainable += [(f"distill_loss.{n}", p) for n, p in self.distill_loss.named_parameters()]
            decay |= {f"distill_loss.{n}" for n, p in self.distill_loss.named_parameters() if p.ndim >= 2}
        groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # --- checkpoints --------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A miniclip folder (model.safetensors, model_config.json, tokenizer files; each written atomically) that
        `MiniClip.from_pretrained` loads; plus the training arguments as JSON."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_pretrained(_StateView(model, state_dict) if state_dict is not None else model, output_dir,
                        format="miniclip", tokenizer=self.processing_class)
        atomic_write_text(Path(output_dir) / "training_args.json", self.args.to_json_string() + "\n")
        if self.distill_loss is not None and self.distill_loss.projection is not None:  # resumes need it
            save_safetensors(self.distill_loss.state_dict(), Path(output_dir) / DISTILL_HEAD)

    def _load_weights(self, folder: str) -> None:
        """Strictly: every tensor of the model must be in the checkpoint with its shape, and nothing else."""
        path = Path(folder) / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no model.safetensors in checkpoint {folder}: is it a ClipTrainer checkpoint? "
                                    "Fix: pass a checkpoint-* folder written by train.py, or 'latest'")
        try:
            self.model.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit the model being trained: {e}. Fix: resume with "
                                  "the same model arguments as the run that wrote it") from None
        head = Path(folder) / DISTILL_HEAD
        if self.distill_loss is not None and self.distill_loss.projection is not None:
            if not head.is_file():
                raise CheckpointError(f"no {DISTILL_HEAD} in checkpoint {folder}, but this run trains a feature-loss "
                                      "projection. Fix: resume with the distillation arguments of the run that wrote it")
            self.distill_loss.load_state_dict(load_file(str(head)), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if model is not None or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info("loading the best model from %s (%s = %s)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        self._load_weights(self.state.best_model_checkpoint)

    # --- evaluation ---------------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Retrieval recall on validation records (evaluation.evaluate_retrieval), logged as eval_t2i_R@1 ...
        eval_mean_recall; a dict of record lists is reported per name (eval_<name>_...). The default evaluation
        (no eval_dataset given, as during training) adds the `extra_eval_datasets` (eval_<name>_...) and zero-shot
        accuracy on `zeroshot_folder` (eval_zeroshot_top1 / top5 / mean_per_class). All are usable as
        metric_for_best_model. Computed on the main process, shared with the others."""
        default = eval_dataset is None
        records = self.eval_dataset if default else eval_dataset
        _check_records(records, "eval_dataset")
        if records is None:
            raise ValueError("evaluation needs validation records: pass eval_dataset=read_caption_file(...) "
                             "(--validation_file in train.py), or set eval_strategy='no'")
        # A sharded model runs only when every process takes part in its forward (each gathers its parameters
        # unit by unit), so every process encodes; an unsharded one is encoded on the main process alone.
        everywhere = is_sharded(self.model_wrapped) or is_sharded(self.model)
        metrics = (self._all_metrics(records, default, metric_key_prefix)
                   if everywhere or self.is_world_process_zero() else None)
        if self.accelerator.num_processes > 1:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _all_metrics(self, records, default: bool, prefix: str) -> dict[str, float]:
        """Retrieval on each record group (the extra sets too in the default evaluation), then zero-shot."""
        groups = dict(records) if isinstance(records, dict) else {None: records}
        if default:
            groups.update(self.extra_eval_datasets)
        metrics = {}
        for name, group in groups.items():
            metrics.update(self._retrieval_metrics(group, prefix if name is None else f"{prefix}_{name}"))
        if default and self.zeroshot_folder is not None:
            metrics.update(self._zeroshot_metrics(prefix))
        return metrics

    def _retrieval_metrics(self, records: list[CaptionRecord], prefix: str) -> dict[str, float]:
        start = time.time()
        raw = evaluate_retrieval(self.encoder(), list(records))
        _reshard(self.model_wrapped)
        metrics = {f"{prefix}_{k}": v for k, v in raw.items()}
        metrics[f"{prefix}_runtime"] = round(time.time() - start, 3)
        return metrics

    def _zeroshot_metrics(self, prefix: str) -> dict[str, float]:
        """Zero-shot accuracy on the image folder; the class classifier is rebuilt from the current text tower
        (templates chosen from the model's text tower, as test.py does)."""
        start = time.time()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        templates = get_templates(self.zeroshot_templates, model.config)
        raw = evaluate_zeroshot(self.encoder(), self.zeroshot_folder, templates)
        metrics = {f"{prefix}_{k}": v for k, v in raw.items()}
        metrics[f"{prefix}_zeroshot_runtime"] = round(time.time() - start, 3)
        return metrics

    def encoder(self) -> Encoder:
        """How evaluation encodes: the unwrapped model (a sharded one: its wrapper's forward) in the run's precision,
        the eval transform and tokenizer."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        batch = self.args.per_device_eval_batch_size
        sharded = next((m for m in (self.model_wrapped, self.model) if is_sharded(m)), None)
        model = ForwardEncoding(sharded) if sharded is not None else self.accelerator.unwrap_model(
            self.model, keep_torch_compile=False)
        return Encoder(model, self.eval_transform, self.processing_class, device=self.args.device, dtype=dtype,
                       image_batch_size=batch, text_batch_size=max(batch, 256),
                       progress=not self.args.disable_tqdm and self.is_world_process_zero())


def is_sharded(model: nn.Module | None) -> bool:
    """Whether FSDP shards `model`: FSDP1 wraps it in FullyShardedDataParallel, FSDP2 turns its parameters into
    DTensors."""
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    return isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters())


class ForwardEncoding(nn.Module):
    """`encode_image` / `encode_text` through the sharded model's `forward`: FSDP gathers parameters in forward
    hooks only, so calling the inner methods directly would meet sharded tensors (open_clip PR #358 met this).
    Returns the forward's normalised embeddings (Encoder normalises again, which changes nothing).
    Runs with inference mode off (no_grad only): FSDP2 re-creates the parameter shards in its hooks, and under
    Encoder's inference mode they would come back as inference tensors that the next optimizer step cannot update
    ("Inplace update to inference tensor outside InferenceMode")."""

    def __init__(self, sharded: nn.Module):
        super().__init__()
        self.sharded = sharded

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return self.sharded(pixel_values=pixel_values.clone()).image_embeds  # (B, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            mask = attention_mask.clone() if attention_mask is not None else None
            return self.sharded(input_ids=input_ids.clone(), attention_mask=mask).text_embeds  # (B, D)


def _reshard(model: nn.Module | None) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward with no backward (as evaluation's); shard them
    again, or the logit-scale clamp and the optimizer would act on the gathered copy."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def _unwrapped_name(name: str) -> str:
    """A parameter name without the FSDP1 / activation-checkpointing wrapper components."""
    return ".".join(part for part in name.split(".")
                    if part not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


class _StateView:
    """A model whose state_dict is a given one (what FSDP / DeepSpeed hand to `_save`), for save_pretrained."""

    def __init__(self, model: nn.Module, state_dict: dict):
        # The learnt scalars are (1,) parameters; a gathered FSDP2 state dict keeps that shape, checkpoints store
        # them 0-d (see model._ScalarParameter).
        scalars = set(scalar_keys(model))
        self.config, self.checkpoint_dir = model.config, model.checkpoint_dir
        self._state = {k: v.reshape(()) if k in scalars and v.numel() == 1 else v for k, v in state_dict.items()}

    def state_dict(self) -> dict:
        return self._state
