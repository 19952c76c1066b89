"""Position embeddings of a checkpoint adapted to another image size or text context length.

Image grids are interpolated bicubically with the class token kept apart, numerically as open_clip's
`resize_pos_embed` does (antialiased, align_corners=False); ResNet attention-pool grids the same way. Text positions
are truncated (shorter context: the kept rows are exactly the trained ones) or extended by repeating the last trained
row (longer context: new positions start untrained-but-sane and need fine-tuning). Leaves out on purpose: changing
the patch size, and BERT positions (BERT already has max_position_embeddings >= any context it allows).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from miniclip.config import ClipConfig

logger = logging.getLogger(__name__)

VIT_POS = "image_encoder.visual.positional_embedding"
RESNET_POS = "image_encoder.visual.attnpool.positional_embedding"
TEXT_POS = "text_encoder.positional_embedding"


def resize_grid_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, C) -> (1 + grid*grid, C): class token kept, the g x g grid resampled bicubically."""
    old_grid = math.isqrt(pos.shape[0] - 1)
    cls_tok, patches = pos[:1], pos[1:]
    dtype = patches.dtype
    patches = patches.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(dtype)  # (grid*grid, C)
    return torch.cat([cls_tok, patches], dim=0)


def resize_text_pos_embed(pos: torch.Tensor, context_length: int) -> torch.Tensor:
    """(L, C) -> (context_length, C): truncated, or extended with copies of the last row."""
    if context_length <= pos.shape[0]:
        return pos[:context_length].clone()
    extra = pos[-1:].expand(context_length - pos.shape[0], -1)
    return torch.cat([pos, extra], dim=0)


def _is_grid(pos, width: int) -> bool:
    return (isinstance(pos, torch.Tensor) and pos.ndim == 2 and pos.shape[1] == width and pos.shape[0] > 1
            and math.isqrt(pos.shape[0] - 1) ** 2 == pos.shape[0] - 1)


def adapt_positions(state: dict, config: ClipConfig) -> list[str]:
    """Resize, in `state` (MiniClip names), the position embeddings whose length differs from `config`'s; shapes
    that do not fit even then are left for the validator to report. Returns what was changed, in words."""
    changes = []
    v, t = config.vision_cfg, config.text_cfg
    key, grid, width = ((RESNET_POS, v.image_size // 32, v.width * 32) if v.is_resnet
                        else (VIT_POS, v.image_size // v.patch_size, v.width))
    pos = state.get(key)
    if _is_grid(pos, width) and pos.shape[0] != grid * grid + 1:
        old = math.isqrt(pos.shape[0] - 1)
        state[key] = resize_grid_pos_embed(pos, grid)
        changes.append(f"image position grid {old}x{old} -> {grid}x{grid} (image_size {v.image_size})")
    pos = state.get(TEXT_POS)
    if (t.tower == "transformer" and isinstance(pos, torch.Tensor) and pos.ndim == 2 and pos.shape[1] == t.width
            and pos.shape[0] != t.context_length):
        state[TEXT_POS] = resize_text_pos_embed(pos, t.context_length)
        changes.append(f"text positions {pos.shape[0]} -> {t.context_length}")
    for change in changes:
        logger.info("resized checkpoint: %s", change)
    return changes
