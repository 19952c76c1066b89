"""`ClipTrainer`: the Hugging Face `Trainer` taught contrastive training. The loss comes from loss.py (global
negatives across processes), weight decay skips gains / biases / embeddings / temperature, locked BatchNorm keeps
its statistics, an optional cached-feature accumulation keeps negatives right over micro-batches, checkpoints are
miniclip folders, and `evaluate()` reports retrieval recall. Everything else (mixed precision, DDP, schedules,
checkpoint rotation, resume, logging integrations) is the stock Trainer.

Leaves out on purpose: FSDP / DeepSpeed specifics (the stock paths run; nothing is tuned for them).
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
from miniclip.data.captions import CaptionRecord
from miniclip.evaluation.encode import Encoder, evaluate_retrieval
from miniclip.evaluation.zeroshot import ImageFolder, TemplateSet, evaluate_zeroshot, get_templates
from miniclip.files import atomic_write_text
from miniclip.loss import build_loss
from miniclip.training.arguments import ClipTrainingArguments, LossKind

__all__ = ["ClipTrainer", "ClipTrainingArguments", "NonFiniteLossError", "decay_parameter_names"]
from miniclip.training.callbacks import CurvesCallback, LogitScaleClampCallback, NonFiniteLossCallback
from miniclip.training.layer_decay import describe_groups, layer_decay_groups
from miniclip.training.locking import Locks, TwoStageCallback, apply_locks, frozen_batchnorms
from miniclip.transforms import image_transform

logger = logging.getLogger(__name__)

# Parameters named like this never decay, whatever their shape: decaying an embedding table or the temperature
# pulls them towards zero for no regularisation benefit (open_clip and Chinese-CLIP exclude them too).
NO_DECAY_NAMES = frozenset({"logit_scale", "logit_bias", "token_embedding", "positional_embedding", "class_embedding",
                            "word_embeddings", "position_embeddings", "token_type_embeddings"})


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
    """
    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the accumulation steps

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, *, loss: LossKind = "clip",
                 locks: Locks | None = None, eval_transform=None, zeroshot_folder: ImageFolder | None = None,
                 zeroshot_templates: TemplateSet = "auto", extra_eval_datasets: dict | None = None, **kwargs):
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

    # --- loss ---------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = self.loss_fn(outputs.image_embeds, outputs.text_embeds, _scalar(outputs.logit_scale),
                            _scalar(outputs.logit_bias))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.feature_accum_steps > 1:
            loss = self._cached_feature_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
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
        states, images, texts = [], [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk in chunks:
                states.append(_rng_state())
                out = model(**chunk)
                images.append(out.image_embeds)  # (b, D)
                texts.append(out.text_embeds)  # (b, D)
        after = _rng_state()
        for j, chunk in enumerate(chunks):
            _set_rng_state(states[j])
            last = j == n - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    out = model(**chunk)
                    scale, bias = _scalar(out.logit_scale), _scalar(out.logit_bias)
                    if not last:
                        scale, bias = scale.detach(), bias.detach() if bias is not None else None
                    loss = self.loss_fn(torch.cat(images[:j] + [out.image_embeds] + images[j + 1:]),  # (k*b, D)
                                        torch.cat(texts[:j] + [out.text_embeds] + texts[j + 1:]), scale, bias)
                loss = loss / self.current_gradient_accumulation_steps
                self.accelerator.backward(loss)
        _set_rng_state(after)
        return loss.detach()

    def floating_point_ops(self, inputs) -> int:
        """Not estimated: the Trainer's 6 * tokens * parameters rule is for language models (it reads `total_flos`
        from this only for its logs)."""
        return 0

    # --- optimizer ----------------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return decay_parameter_names(model)

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
        metrics = None
        if self.is_world_process_zero():
            groups = dict(records) if isinstance(records, dict) else {None: records}
            if default:
                groups.update(self.extra_eval_datasets)
            metrics = {}
            for name, group in groups.items():
                metrics.update(self._retrieval_metrics(group, metric_key_prefix if name is None
                                                       else f"{metric_key_prefix}_{name}"))
            if default and self.zeroshot_folder is not None:
                metrics.update(self._zeroshot_metrics(metric_key_prefix))
        if self.accelerator.num_processes > 1:
            box = [metrics]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _retrieval_metrics(self, records: list[CaptionRecord], prefix: str) -> dict[str, float]:
        start = time.time()
        raw = evaluate_retrieval(self.encoder(), list(records))
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
        """How evaluation encodes: the unwrapped model in the run's precision, the eval transform and tokenizer."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        batch = self.args.per_device_eval_batch_size
        return Encoder(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), self.eval_transform,
                       self.processing_class, device=self.args.device, dtype=dtype, image_batch_size=batch,
                       text_batch_size=max(batch, 256), progress=not self.args.disable_tqdm)


class _StateView:
    """A model whose state_dict is a given one (what FSDP / DeepSpeed hand to `_save`), for save_pretrained."""

    def __init__(self, model: nn.Module, state_dict: dict):
        self.config, self._state = model.config, state_dict
        self.checkpoint_dir = model.checkpoint_dir

    def state_dict(self) -> dict:
        return self._state
