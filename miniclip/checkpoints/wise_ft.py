"""WiSE-FT (Wortsman et al., CVPR 2022): the weight-space ensemble theta(alpha) = (1 - alpha) * theta_zeroshot +
alpha * theta_finetuned of a model before and after finetuning. Between the two ends it usually keeps most of the
zero-shot accuracy while gaining most of the target-domain accuracy. Here: the interpolation itself and the check
that both models have one architecture; apps/wise_ft.py evaluates a sweep over alpha.

Leaves out on purpose: fisher-weighted or per-layer mixing coefficients and model soups of more than two models.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from miniclip.checkpoints.architecture import architecture


def check_same_architecture(zeroshot: nn.Module, finetuned: nn.Module) -> None:
    """Raise a ValueError naming the first difference unless both MiniClips have the same architecture (config
    and every tensor's name and shape): only then is the average of their weights a model."""
    a, b = architecture(zeroshot.config), architecture(finetuned.config)
    a.update(quick_gelu=zeroshot.config.quick_gelu), b.update(quick_gelu=finetuned.config.quick_gelu)
    for key in a:
        if a[key] != b.get(key):
            raise ValueError(f"WiSE-FT needs the same architecture, but {key} is {a[key]} (zero-shot) vs "
                             f"{b.get(key)} (finetuned). Fix: finetune from the zero-shot checkpoint itself")
    sa, sb = zeroshot.state_dict(), finetuned.state_dict()
    missing = sorted(set(sa) ^ set(sb))
    if missing:
        raise ValueError(f"WiSE-FT needs the same tensors, but {missing[0]} is in only one of the models "
                         f"({len(missing)} such keys)")
    for key in sa:
        if sa[key].shape != sb[key].shape:
            raise ValueError(f"WiSE-FT needs the same shapes, but {key} is {tuple(sa[key].shape)} (zero-shot) vs "
                             f"{tuple(sb[key].shape)} (finetuned)")


def interpolate_state_dicts(zeroshot: dict, finetuned: dict, alpha: float) -> dict:
    """(1 - alpha) * zeroshot + alpha * finetuned for every floating tensor, computed in float32 and cast back;
    alpha 0 and 1 return exact copies of the inputs. Integer tensors (counters, masks) come from the finetuned
    model. alpha outside [0, 1] extrapolates, as the paper's Figure 7 does, and is allowed."""
    if not isinstance(alpha, (int, float)) or alpha != alpha:
        raise ValueError(f"alpha={alpha!r} must be a number")
    if set(zeroshot) != set(finetuned):
        raise ValueError(f"the state dicts differ in keys, e.g. {sorted(set(zeroshot) ^ set(finetuned))[0]}")
    out = {}
    for key, theta_0 in zeroshot.items():
        theta_1 = finetuned[key]
        if alpha == 0:
            out[key] = theta_0.detach().clone()
        elif alpha == 1 or not theta_1.is_floating_point():
            out[key] = theta_1.detach().clone()
        else:
            mixed = (1 - alpha) * theta_0.detach().float() + alpha * theta_1.detach().float()
            out[key] = mixed.to(theta_1.dtype)
    return out


def wise_ft(zeroshot: nn.Module, finetuned: nn.Module, alpha: float) -> nn.Module:
    """A new model (a copy of `finetuned`) holding the interpolated weights; both inputs stay as they are."""
    check_same_architecture(zeroshot, finetuned)
    model = copy.deepcopy(finetuned)
    with torch.no_grad():
        model.load_state_dict(interpolate_state_dicts(zeroshot.state_dict(), finetuned.state_dict(), alpha))
    return model
