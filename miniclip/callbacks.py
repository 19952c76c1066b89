"""The `TrainerCallback`s of `ClipTrainer`: the logit-scale clamp, the two-stage (locked, then unlocked) image
tower, and the loss / recall curves written at the end. Each is a few lines around one Trainer event.

Leaves out on purpose: early stopping and the like (transformers ships those).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # CLIP paper, sec. 2.5: the temperature is clipped so logits are scaled by <= 100


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnt log-temperature in [0, ln 100] (a multiplier between 1 and 100)."""
    holder = getattr(model, "logit_scale", None)
    param = getattr(holder, "logit_scale", None)
    if isinstance(param, torch.Tensor):
        with torch.no_grad():
            param.clamp_(0, MAX_LOGIT_SCALE)


class LogitScaleClampCallback(TrainerCallback):
    """Clamp after every optimizer step, and once before the first step (an initial value above ln 100 is
    clamped before it is ever used)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        clamp_logit_scale(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        clamp_logit_scale(model)


class NonFiniteLossCallback(TrainerCallback):
    """Stops the run on a NaN / inf loss at the Trainer's own sync points (log, save, evaluate, end), so the check
    costs no host sync per step and no diverged checkpoint is written. The trainer records the first bad step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.trainer.raise_if_nonfinite()


class TwoStageCallback(TrainerCallback):
    """Chinese-CLIP's two-stage pretraining (Yang et al. 2022): the image tower stays locked until optimizer
    step `unlock_step`, then trains with the rest.

    `params` are the image-tower parameters locked in stage 1. The trainer hands them over with requires_grad=True,
    so that the optimizer (built before training) and DistributedDataParallel (which only ever synchronises the
    parameters that required grad when it wrapped the model) both include them. This callback then switches
    requires_grad off before the first step and back on at `unlock_step`. A parameter without gradient is skipped by
    torch's optimizers (no update, no weight decay, no Adam state), so in stage 1 it stays bit-identical, and
    autograd does not even compute its gradient (the image tower runs forward only). Resumed runs land in the right
    stage because the check runs at every step.
    """

    def __init__(self, params: list[torch.nn.Parameter], unlock_step: int):
        self.params, self.unlock_step = params, unlock_step
        self.unlocked: bool | None = None

    def _apply(self, state) -> None:
        unlocked = state.global_step >= self.unlock_step
        if unlocked != self.unlocked:
            for p in self.params:
                p.requires_grad_(unlocked)
            if self.unlocked is not None or unlocked:
                logger.info("step %d: image tower %s", state.global_step, "unlocked" if unlocked else "locked")
            self.unlocked = unlocked

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)


class CurvesCallback(TrainerCallback):
    """At the end of training: `loss_curve.png` (training loss per logged step) and, when evaluation ran,
    `recall_curves.png` (retrieval recalls per evaluation) in output_dir, on the main process only."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from .plots import plot_curves
        history = state.log_history
        present = {k for entry in history for k in entry}
        if "loss" in present:
            path = plot_curves(history, Path(args.output_dir) / "loss_curve.png", keys=["loss"])
            logger.info("wrote %s", path)
        recalls = sorted(k for k in present if k.startswith("eval_") and ("_R@" in k or k.endswith("mean_recall")))
        if recalls:
            path = plot_curves(history, Path(args.output_dir) / "recall_curves.png", keys=recalls)
            logger.info("wrote %s", path)
