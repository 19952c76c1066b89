"""training/locking.py: frozen BatchNorm statistics keep every key and survive model.train(); locks apply as asked;
a two-stage run needs a locked tower. (End-to-end training with locks: tests/test_trainer.py.)"""
import io

import pytest
import torch
from torch import nn

from miniclip import MiniClip
from miniclip.training.locking import Locks, apply_locks, freeze_batchnorm_stats, frozen_batchnorms, locked_batchnorms


def tiny(name="tiny-resnet"):
    torch.manual_seed(0)
    return MiniClip(name)


def test_frozen_batchnorm_keeps_keys_stays_in_eval_and_unfreezes():
    model = tiny()
    keys = list(model.state_dict())
    model.lock_image_tower(freeze_bn_stats=False)
    bns = locked_batchnorms(model.image_encoder)
    assert bns and all(isinstance(m, nn.BatchNorm2d) for m in bns)
    freeze_batchnorm_stats(bns)
    model.train()
    assert all(not m.training for m in bns) and model.text_encoder.training
    assert list(model.state_dict()) == keys  # same parameters and buffers, same names
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))  # statistics untouched in train()
    torch.save(model, io.BytesIO())  # the swapped classes are importable, so the model still pickles
    freeze_batchnorm_stats(bns, frozen=False)
    model.train()
    assert all(type(m) is nn.BatchNorm2d and m.training for m in bns)


def test_apply_locks_locks_what_it_is_told():
    model = tiny("tiny-vit")
    assert apply_locks(model, Locks(text=True)) == []
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.image_encoder.parameters())
    model = tiny()
    assert apply_locks(model, Locks(image=True)) == []
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert frozen_batchnorms(model.image_encoder) == locked_batchnorms(model.image_encoder)


def test_two_stage_hands_back_the_locked_parameters_trainable():
    model = tiny()
    staged = apply_locks(model, Locks(image=True, unlock_image_step=3))
    assert len(staged) == len(list(model.image_encoder.parameters())) and all(p.requires_grad for p in staged)
    assert frozen_batchnorms(model.image_encoder)  # frozen until the unlock step
    with pytest.raises(ValueError, match="lock_image_tower"):
        apply_locks(tiny("tiny-vit"), Locks(unlock_image_step=3))


def test_bad_locks_are_refused():
    with pytest.raises(ValueError, match="image_unlocked_groups=-1"):
        Locks(image_unlocked_groups=-1)
    with pytest.raises(ValueError, match="ResNet"):
        apply_locks(tiny(), Locks(image=True, image_unlocked_groups=1))
