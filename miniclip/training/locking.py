"""Locking towers (LiT, Zhai et al. 2022), Chinese-CLIP's two-stage schedule and frozen BatchNorm statistics, owned
here end to end: `Locks` says what to lock, `ClipTrainer` applies it once at construction, `TwoStageCallback`
unlocks at the given step.

Leaves out on purpose: swapping in FrozenBatchNorm2d (it renames parameters to buffers, so the tower could not
unlock and checkpoints would change keys); a locked BatchNorm keeps its class's parameters and only stays in eval mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


@dataclass
class Locks:
    """What ClipTrainer locks. A tower the caller already locked (`model.lock_image_tower()`) counts as locked."""
    image: bool = False  # freeze the image tower
    image_unlocked_groups: int = 0  # ... except its last N layer groups (ViT only)
    text: bool = False  # freeze the text tower
    text_unlocked_layers: int = 0  # ... except its last N layers
    unlock_image_step: int | None = None  # two-stage: the image tower trains from this optimizer step on
    freeze_bn_stats: bool = True  # BatchNorm layers whose parameters are all locked keep their running statistics

    def __post_init__(self):
        for name in ("image_unlocked_groups", "text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.unlock_image_step is not None and self.unlock_image_step < 0:
            raise ValueError(f"unlock_image_step={self.unlock_image_step} must be >= 0")


class _FrozenStats:
    """Mixed into a BatchNorm class: `train()` leaves the layer in eval mode, so it normalises with (and never
    updates) its running statistics, whatever the Trainer calls."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenStatsBatchNorm1d(_FrozenStats, nn.BatchNorm1d):
    pass


class FrozenStatsBatchNorm2d(_FrozenStats, nn.BatchNorm2d):
    pass


class FrozenStatsBatchNorm3d(_FrozenStats, nn.BatchNorm3d):
    pass


# Module-level classes, so a model holding them still pickles (torch.save(model), multiprocessing).
_FROZEN_CLASSES: dict[type, type] = {nn.BatchNorm1d: FrozenStatsBatchNorm1d, nn.BatchNorm2d: FrozenStatsBatchNorm2d,
                                     nn.BatchNorm3d: FrozenStatsBatchNorm3d}


def _frozen_class(cls: type) -> type:
    if cls not in _FROZEN_CLASSES:  # another BatchNorm subclass (e.g. timm's): made once
        _FROZEN_CLASSES[cls] = type(f"FrozenStats{cls.__name__}", (_FrozenStats, cls), {})
    return _FROZEN_CLASSES[cls]


def freeze_batchnorm_stats(modules: list[nn.Module], frozen: bool = True) -> None:
    """Switch BatchNorm layers to (or back from) frozen statistics in place: only the class changes, so parameters,
    buffers and state-dict keys stay as they are."""
    for module in modules:
        base = next(c for c in type(module).__mro__ if c is not _FrozenStats and not issubclass(c, _FrozenStats))
        module.__class__ = _frozen_class(base) if frozen else base
        module.train(module.training if not frozen else False)


def locked_batchnorms(module: nn.Module) -> list[nn.Module]:
    """BatchNorm layers of `module` with parameters, all of them locked (requires_grad False)."""
    found = []
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            found.append(m)
    return found


def frozen_batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `module` currently switched to frozen statistics."""
    return [m for m in module.modules() if isinstance(m, _FrozenStats)]


def apply_locks(model: nn.Module, locks: Locks) -> list[nn.Parameter]:
    """Lock what `locks` says and freeze locked BatchNorm statistics. Returns the image-tower parameters a two-stage
    run unlocks later; they are handed back with requires_grad=True (see TwoStageCallback for why)."""
    if locks.image:
        if model.config.vision_cfg.is_resnet and locks.image_unlocked_groups:
            raise ValueError("lock_image_unlocked_groups is not supported for a ResNet image tower (open_clip "
                             "locks a ModifiedResNet whole). Fix: use 0, or a ViT config")
        model.lock_image_tower(unlocked_groups=locks.image_unlocked_groups, freeze_bn_stats=False)
    if locks.text:
        model.lock_text_tower(unlocked_layers=locks.text_unlocked_layers)
    if locks.freeze_bn_stats:
        freeze_batchnorm_stats(locked_batchnorms(model))
    if locks.unlock_image_step is None:
        return []
    staged = [p for p in model.image_encoder.parameters() if not p.requires_grad]
    if not staged:
        raise ValueError("unlock_image_step is set but the image tower has no locked parameter: lock it first "
                         "(Locks(image=True), model.lock_image_tower(), --lock_image in train.py)")
    for p in staged:
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(p.numel() for p in staged)
    logger.info("%s parameters, %s trainable in stage 1", f"{model.num_parameters():,}", f"{trainable:,}")
    return staged


class TwoStageCallback(TrainerCallback):
    """Chinese-CLIP's two-stage pretraining (Yang et al. 2022): the image tower stays locked until optimizer
    step `unlock_step`, then trains with the rest (its BatchNorm statistics too).

    `params` are the image-tower parameters locked in stage 1. They arrive with requires_grad=True, so that the
    optimizer (built before training) and DistributedDataParallel (which only ever synchronises the parameters that
    required grad when it wrapped the model) both include them. This callback switches requires_grad off before the
    first step and back on at `unlock_step`. A parameter without gradient is skipped by torch's optimizers (no
    update, no weight decay, no Adam state), so in stage 1 it stays bit-identical, and autograd does not even compute
    its gradient. Resumed runs land in the right stage because the check runs at every step.
    """

    def __init__(self, params: list[torch.nn.Parameter], unlock_step: int, batchnorms: list[nn.Module] = ()):
        self.params, self.unlock_step, self.batchnorms = params, unlock_step, list(batchnorms)
        self.unlocked: bool | None = None

    def _apply(self, state) -> None:
        unlocked = state.global_step >= self.unlock_step
        if unlocked != self.unlocked:
            for p in self.params:
                p.requires_grad_(unlocked)
            freeze_batchnorm_stats(self.batchnorms, frozen=not unlocked)
            if self.unlocked is not None or unlocked:
                logger.info("step %d: image tower %s", state.global_step, "unlocked" if unlocked else "locked")
            self.unlocked = unlocked

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)
