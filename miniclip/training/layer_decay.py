"""Layer-wise learning-rate decay (BEiT, Bao et al. 2022; used for CLIP finetuning by FD-CLIP and open_clip): the
lr of layer i of a tower with `depth` layers is lr * decay ** (depth - i), so the embeddings (i = 0) move least and
the last block most; the final norm, projection and the logit scale / bias train at the full lr. Parameter groups
are (layer, decay / no decay) pairs, so the weight-decay rule of trainer.py still applies.

Leaves out on purpose: per-layer weight decay and decay inside the parameters of one block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# (pattern on the name inside the tower, layer index or None for "the block number + 1") per tower kind.
_BLOCK = {"vit": re.compile(r"^transformer\.resblocks\.(\d+)\."), "resnet": re.compile(r"^layer([1-4])\."),
          "transformer": re.compile(r"^transformer\.resblocks\.(\d+)\."), "bert": re.compile(r"^bert\.encoder\.layer\.(\d+)\.")}
_EMBEDDINGS = {"vit": ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patchnorm_pre_ln."),
               "resnet": ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3."),
               "transformer": ("token_embedding.", "positional_embedding"), "bert": ("bert.embeddings.",)}
_PREFIX = {"image": "image_encoder.visual.", "text": "text_encoder."}


@dataclass(frozen=True)
class LayerId:
    """Where a parameter sits: tower ("image" / "text" / "other"), layer index (0 = embeddings, depth = head) and the
    tower's depth. `name` labels its optimizer group: image.embeddings, image.block.3, text.head, other."""
    tower: str
    layer: int
    depth: int

    @property
    def name(self) -> str:
        if self.tower == "other":
            return "other"
        if self.layer == 0:
            return f"{self.tower}.embeddings"
        return f"{self.tower}.head" if self.layer == self.depth else f"{self.tower}.block.{self.layer - 1}"


def _tower_kind(model: nn.Module, tower: str) -> tuple[str, int]:
    """(kind, number of blocks) of one tower of a MiniClip."""
    config = model.config
    if tower == "image":
        v = config.vision_cfg
        return ("resnet", 4) if v.is_resnet else ("vit", v.layers)
    return config.text_cfg.tower, config.text_cfg.layers


def layer_id(model: nn.Module, name: str) -> LayerId:
    """The LayerId of parameter `name` of a MiniClip: blocks count from 1, the embeddings are 0 and everything after
    the last block (final norm, projection, attention pool) is depth = blocks + 1; the temperature is "other"."""
    for tower, prefix in _PREFIX.items():
        if not name.startswith(prefix):
            continue
        kind, blocks = _tower_kind(model, tower)
        inner = name[len(prefix):]
        depth = blocks + 1
        match = _BLOCK[kind].match(inner)
        if match:
            index = int(match.group(1))
            return LayerId(tower, index if kind == "resnet" else index + 1, depth)
        if inner.startswith(_EMBEDDINGS[kind]):
            return LayerId(tower, 0, depth)
        return LayerId(tower, depth, depth)
    return LayerId("other", 0, 0)


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, decay_names: set[str],
                       image_decay: float = 1.0, text_decay: float = 1.0) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters of `model`: one per (layer, weight decay or not),
    each with its own "lr" and a "name" such as "image.block.1/decay". `decay_names` get `weight_decay`."""
    for what, value in (("image_layer_decay", image_decay), ("text_layer_decay", text_decay)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{what}={value} must be in (0, 1] (1 = off)")
    factor = {"image": image_decay, "text": text_decay, "other": 1.0}
    groups: dict[str, dict] = {}
    order: dict[str, tuple] = {}  # groups listed image, text, other; embeddings first; decay before no decay
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        where = layer_id(model, name)
        decays = name in decay_names
        key = f"{where.name}/{'decay' if decays else 'no_decay'}"
        if key not in groups:
            scale = factor[where.tower] ** (where.depth - where.layer)
            groups[key] = {"params": [], "param_names": [], "name": key, "lr": lr * scale,
                           "weight_decay": weight_decay if decays else 0.0}
            order[key] = (list(factor).index(where.tower), where.layer, not decays)
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups, key=order.__getitem__)]


def describe_groups(groups: list[dict]) -> str:
    """A table of the groups (name, lr, weight decay, tensors, parameters), for the log at the start of training."""
    lines = [f"{'group':<28} {'lr':>10} {'wd':>6} {'tensors':>8} {'params':>11}"]
    for g in groups:
        lines.append(f"{g['name']:<28} {g['lr']:10.3e} {g['weight_decay']:6.3g} {len(g['params']):8d} "
                     f"{sum(p.numel() for p in g['params']):11,d}")
    return "\n".join(lines)
