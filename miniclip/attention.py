"""Speed paths that keep open_clip's parameters and math: a batch-first self-attention for its transformer blocks.

open_clip's `ResidualAttentionBlock` calls `nn.MultiheadAttention`, which in training transposes to sequence-first,
splits q/k/v with copies and, on CPU, runs the flash kernel whose bf16 backward is slow for CLIP's short sequences
(50 image / ~20 text tokens). `FastResidualAttentionBlock` reads the same `in_proj_*` / `out_proj` weights and
computes the same function batch-first. Leaves out on purpose: cross-attention and attention dropout (not used by
CLIP towers); such blocks keep open_clip's code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


def self_attention(x: torch.Tensor, attn: nn.MultiheadAttention, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with `attn`'s packed projections (Vaswani et al. 2017, eq. 1). x: (B, L, W).

    On CPU the scores are formed with two batched matmuls: for L <= ~200 this beats the fused kernels in training
    (bf16 backward of the CPU flash kernel is ~5x slower at L=50) and in bf16 inference (2x). The softmax runs in
    fp32 under autocast, as the fused kernels do. The fused `scaled_dot_product_attention` wins on GPUs and in fp32
    inference on CPU (3x: it reads the strided q / k / v in place and writes (B, L, H, Dh) directly), so it is used
    there.
    """
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3W)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)  # open_clip passes a float mask; (L, L) additive, -inf above the diagonal
    if x.device.type == "cpu" and (torch.is_grad_enabled() or q.dtype != torch.float32):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, L, L)
        if attn_mask is not None:
            scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        out = probs @ v  # (B, H, L, Dh)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(batch, length, width)  # (B, L, W)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class FastResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip's pre-LN block (same parameters, same state-dict keys) with `self_attention` in place of
    `nn.MultiheadAttention.forward`. Installed by `use_fast_attention`, never constructed directly."""

    def attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:  # cross-attention: open_clip's own path
            return super().attention(q_x, k_x, v_x, attn_mask)
        return self_attention(q_x, self.attn, attn_mask)


def _supported(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and isinstance(attn, nn.MultiheadAttention) and attn.batch_first
            and attn._qkv_same_embed_dim and attn.dropout == 0.0 and attn.in_proj_weight is not None
            and not hasattr(block, "ln_1_kv"))


def use_fast_attention(model: nn.Module, enable: bool = True) -> int:
    """Switch every supported open_clip block in `model` to (or back from) `FastResidualAttentionBlock`, in place.

    Only the class changes, so parameters, buffers, state-dict keys and hooks are untouched. Returns how many blocks
    were switched.
    """
    count = 0
    for module in model.modules():
        if enable and _supported(module):
            module.__class__ = FastResidualAttentionBlock
            count += 1
        elif not enable and type(module) is FastResidualAttentionBlock:
            module.__class__ = ResidualAttentionBlock
            count += 1
    return count
