"""Weight inheritance (TinyCLIP, Wu et al. ICCV 2023, sec. 3.2, "manual inheritance"): a smaller student starts from
a subset of a trained teacher's layers, and from its leading channels / attention heads where it is narrower, instead
of random weights. `inherit(teacher, student_config)` returns the student and an `InheritReport` naming where every
student tensor came from. Leaves out on purpose: TinyCLIP's automatic inheritance (learnt masks) and narrowing a
ResNet image tower (its channels run through BatchNorm statistics and a 32x-wide attention pool; depth works).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from miniclip.checkpoints.resize import RESNET_POS, TEXT_POS, VIT_POS, resize_grid_pos_embed, resize_text_pos_embed
from miniclip.config import ClipConfig, check_literal, load_model_config
from miniclip.model import MiniClip

LayerChoice = Literal["uniform"]
WidthChoice = Literal["first"]
# Where each tower's numbered blocks live; the number after the prefix is the layer index.
BLOCKS = {"image": re.compile(r"^(image_encoder\.visual\.transformer\.resblocks\.)(\d+)(\..*)$"),
          "text": re.compile(r"^(text_encoder\.transformer\.resblocks\.|text_encoder\.bert\.encoder\.layer\.)(\d+)(\..*)$")}
RESNET_BLOCK = re.compile(r"^(image_encoder\.visual\.layer)([1-4])\.(\d+)(\..*)$")


class InheritError(ValueError):
    """The student cannot inherit from this teacher; the message says which dimension and what to change."""


@dataclass
class InheritReport:
    """sources: student tensor -> teacher tensor it came from (with the slice when narrower); fresh: student tensors
    left at their random initialisation; layers: for each tower, the teacher layer index of each student layer."""
    sources: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    layers: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        sliced = sum("[" in s for s in self.sources.values())
        towers = "; ".join(f"{name} layers {idx}" for name, idx in self.layers.items())
        return (f"inherited {len(self.sources)} tensors ({sliced} sliced to the student's width), "
                f"{len(self.fresh)} fresh ({', '.join(self.fresh) or 'none'}); {towers}")

    def table(self) -> str:
        """One line per student tensor: `student <- teacher[slice]` or `student <- fresh`."""
        lines = [f"{k} <- {v}" for k, v in self.sources.items()] + [f"{k} <- fresh" for k in self.fresh]
        return "\n".join(lines)


def select_layers(teacher_layers: int, student_layers: int, choice: LayerChoice | list[int], tower: str) -> list[int]:
    """Teacher layer index of each student layer. "uniform" spreads them evenly and keeps the first and the last
    (the last feeds the final LayerNorm and projection the student also inherits)."""
    if student_layers > teacher_layers:
        raise InheritError(f"{tower} tower: the student has {student_layers} layers, the teacher only "
                           f"{teacher_layers}; a student inherits a subset. Fix: a shallower student config")
    if isinstance(choice, str):
        check_literal(choice, LayerChoice, "layers")
        if student_layers == 1:
            return [teacher_layers - 1]
        return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]
    chosen = [int(i) for i in choice]
    if len(chosen) != student_layers or len(set(chosen)) != len(chosen) or not all(0 <= i < teacher_layers for i in chosen):
        raise InheritError(f"{tower} tower: layers={chosen} must name {student_layers} distinct teacher layers in "
                           f"0..{teacher_layers - 1}")
    return chosen


def _no_wider(what: str, student, teacher) -> None:
    if student > teacher:
        raise InheritError(f"{what}: the student's {student} exceeds the teacher's {teacher}; a student inherits "
                           "leading channels only. Fix: a narrower student config")


def _check_vision(s, t) -> None:
    if s.is_resnet != t.is_resnet:
        raise InheritError("image tower: teacher and student must both be ViTs or both ResNets "
                           f"(teacher layers={t.layers}, student layers={s.layers})")
    if s.is_resnet:
        if s.width != t.width:
            raise InheritError(f"image tower: ResNet width {s.width} differs from the teacher's {t.width}; a ResNet "
                               "inherits blocks at the teacher's width only. Fix: vision_cfg.width=" f"{t.width}")
        for stage, (a, b) in enumerate(zip(s.layers, t.layers), start=1):
            if a > b:
                raise InheritError(f"image tower: ResNet stage {stage} has {a} blocks, the teacher's {b}")
        return
    if s.patch_size != t.patch_size:
        raise InheritError(f"image tower: patch_size {s.patch_size} differs from the teacher's {t.patch_size}; the "
                           "patch embedding cannot be inherited. Fix: vision_cfg.patch_size=" f"{t.patch_size}")
    _no_wider("vision_cfg.width", s.width, t.width)
    _no_wider("vision_cfg MLP width", int(s.width * s.mlp_ratio), int(t.width * t.mlp_ratio))
    if s.width != t.width and s.head_width != t.head_width:
        raise InheritError(f"image tower: head_width {s.head_width} differs from the teacher's {t.head_width}; "
                           "leading heads are only whole heads at the same head width")


def _check_text(s, t) -> None:
    if s.tower != t.tower:
        raise InheritError(f"text tower: the student's {s.tower!r} cannot inherit from the teacher's {t.tower!r}")
    if s.vocab_size != t.vocab_size:
        raise InheritError(f"text tower: vocab_size {s.vocab_size} differs from the teacher's {t.vocab_size}; "
                           "token embeddings are only meaningful with the same tokenizer")
    _no_wider("text_cfg.width", s.width, t.width)
    s_mlp = s.intermediate_size if s.tower == "bert" else int(s.width * s.mlp_ratio)
    t_mlp = t.intermediate_size if t.tower == "bert" else int(t.width * t.mlp_ratio)
    _no_wider("text_cfg MLP width", s_mlp, t_mlp)
    if s.width != t.width and s.width // s.heads != t.width // t.heads:
        raise InheritError(f"text tower: head size {s.width // s.heads} differs from the teacher's "
                           f"{t.width // t.heads}; leading heads are only whole heads at the same head size")
    if s.tower == "bert":
        _no_wider("text_cfg.max_position_embeddings", s.max_position_embeddings, t.max_position_embeddings)
        _no_wider("text_cfg.type_vocab_size", s.type_vocab_size, t.type_vocab_size)


def _teacher_key(key: str, layers: dict[str, list[int]]) -> str:
    """The teacher tensor a student tensor inherits: the same name with the layer index mapped."""
    for tower, pattern in BLOCKS.items():
        match = pattern.match(key)
        if match:
            return f"{match[1]}{layers[tower][int(match[2])]}{match[3]}"
    match = RESNET_BLOCK.match(key)
    if match:
        return f"{match[1]}{match[2]}.{layers[f'image.layer{match[2]}'][int(match[3])]}{match[4]}"
    return key


def _positions(key: str, value: torch.Tensor, config: ClipConfig) -> tuple[torch.Tensor, str]:
    """Position embeddings resampled (image grid) or truncated / extended (causal text) to the student's size."""
    v, t = config.vision_cfg, config.text_cfg
    if key in (VIT_POS, RESNET_POS):
        grid = v.image_size // (32 if v.is_resnet else v.patch_size)
        if value.shape[0] != grid * grid + 1:
            return resize_grid_pos_embed(value, grid), f" (grid resampled to {grid}x{grid})"
    if key == TEXT_POS and value.shape[0] != t.context_length:
        return resize_text_pos_embed(value, t.context_length), f" (positions {value.shape[0]} -> {t.context_length})"
    return value, ""


def _slice(key: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str]:
    """The leading part of `value` with the student's `shape`. Attention's stacked q/k/v projection (3W, W) is
    sliced per third, so the student keeps the teacher's leading heads of each of q, k and v."""
    if value.shape == shape:
        return value.clone(), ""
    if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
        parts = value.reshape(3, value.shape[0] // 3, *value.shape[1:])  # (3, W, W) or (3, W)
        width = shape[0] // 3
        index = (slice(None), slice(width)) + tuple(slice(n) for n in shape[1:])
        return parts[index].reshape(shape).clone(), f"[q,k,v :{width} each{''.join(f', :{n}' for n in shape[1:])}]"
    if value.ndim != len(shape) or any(a > b for a, b in zip(shape, value.shape)):
        raise InheritError(f"{key}: student shape {tuple(shape)} does not fit in the teacher's {tuple(value.shape)}")
    where = ", ".join(f":{n}" if n < m else ":" for n, m in zip(shape, value.shape))
    return value[tuple(slice(n) for n in shape)].clone(), f"[{where}]"


def _choose_layers(teacher: ClipConfig, student: ClipConfig, layers) -> dict[str, list[int]]:
    """{"image": [...], "text": [...]} (a ResNet: one entry per stage, "image.layer1" ...)."""
    pick = {tower: layers.get(tower, "uniform") if isinstance(layers, dict) else layers for tower in ("image", "text")}
    s, t = student.vision_cfg, teacher.vision_cfg
    chosen = {}
    if s.is_resnet:
        if not isinstance(pick["image"], str):
            raise InheritError("layers: a ResNet image tower takes 'uniform' (per stage), not a list of indices")
        for stage, (a, b) in enumerate(zip(s.layers, t.layers), start=1):
            # block 0 of a stage holds its downsampling, so it is always kept
            chosen[f"image.layer{stage}"] = [0] if a == 1 else select_layers(b, a, "uniform", f"image stage {stage}")
    else:
        chosen["image"] = select_layers(t.layers, s.layers, pick["image"], "image")
    chosen["text"] = select_layers(teacher.text_cfg.layers, student.text_cfg.layers, pick["text"], "text")
    return chosen


def inherit(teacher: MiniClip, student_config: ClipConfig | str | dict,
            layers: LayerChoice | list[int] | dict[str, list[int]] = "uniform",
            width: WidthChoice = "first") -> tuple[MiniClip, InheritReport]:
    """A `MiniClip` built from `student_config` whose tensors come from `teacher` where they can.

    layers: "uniform" (evenly spread, first and last kept), or the teacher layer index of each student layer, one
        list for both towers or {"image": [...], "text": [...]}. For a ResNet, "uniform" applies to each stage.
    width: "first" = a narrower student keeps the leading channels, MLP units and attention heads (TinyCLIP's
        manual inheritance); the only choice.
    Raises InheritError naming the dimension that cannot be inherited. Tensors without a teacher counterpart (a
    logit bias the teacher lacks) stay freshly initialised and are listed in the report.
    """
    check_literal(width, WidthChoice, "width")
    config = load_model_config(student_config)
    _check_vision(config.vision_cfg, teacher.config.vision_cfg)
    _check_text(config.text_cfg, teacher.config.text_cfg)
    _no_wider("embed_dim", config.embed_dim, teacher.config.embed_dim)
    report = InheritReport(layers=_choose_layers(teacher.config, config, layers))
    student = MiniClip(config)
    source = teacher.state_dict()
    state = student.state_dict()
    for key, target in state.items():
        teacher_key = _teacher_key(key, report.layers)
        if teacher_key not in source:
            report.fresh.append(key)
            continue
        value, note = _positions(key, source[teacher_key].detach(), config)
        value, where = _slice(key, value, target.shape)
        state[key] = value.to(target.dtype)
        report.sources[key] = teacher_key + where + note
    student.load_state_dict(state, strict=True)
    return student, report
