"""The `TrainerCallback`s of `ClipTrainer`: the logit-scale clamp, the NaN / inf stop, and the loss / recall
curves written at the end. Each is a few lines around one Trainer event.

Leaves out on purpose: early stopping and the like (transformers ships those).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from miniclip.evaluation.metrics import is_recall
from miniclip.evaluation.plots import plot_curves

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


class CurvesCallback(TrainerCallback):
    """At the end of training: `loss_curve.png` (training loss per logged step) and, when evaluation ran,
    `recall_curves.png` (retrieval recalls per evaluation) and `zeroshot_curves.png` (zero-shot accuracy per
    evaluation) in output_dir, on the main process only."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        history = state.log_history
        present = {k for entry in history for k in entry}
        if "loss" in present:
            path = plot_curves(history, Path(args.output_dir) / "loss_curve.png", keys=["loss"])
            logger.info("wrote %s", path)
        recalls = sorted(k for k in present if k.startswith("eval_") and is_recall(k))
        if recalls:
            path = plot_curves(history, Path(args.output_dir) / "recall_curves.png", keys=recalls)
            logger.info("wrote %s", path)
        zeroshot = sorted(k for k in present if k.startswith("eval_") and re.search(r"zeroshot_top\d+$", k))
        if zeroshot:  # the "what it knew" curves of a finetune, beside the target-domain recalls
            path = plot_curves(history, Path(args.output_dir) / "zeroshot_curves.png", keys=zeroshot)
            logger.info("wrote %s", path)
