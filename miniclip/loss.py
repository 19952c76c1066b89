"""Contrastive losses over L2-normalised embeddings: CLIP's symmetric cross-entropy (Radford et al. 2021) and
SigLIP's pairwise sigmoid loss (Zhai et al. 2023), both with negatives from every process when torch.distributed
is initialised. Leaves out on purpose: CoCa / distillation losses and SigLIP's ring (neighbour-exchange) variant.

Shapes: image_embeds, text_embeds (B, D) per process; logit_scale, logit_bias () scalars (the multiplier exp(t),
not t: `MiniClip.forward` already returns exp).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from miniclip.config import check_literal
from miniclip.distributed import all_gather_features, rank, world_size

LossKind = Literal["clip", "siglip"]  # symmetric cross-entropy (CLIP) or pairwise sigmoid (SigLIP)


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over `logit_scale * cosine` logits; pair i is the positive of row / column i.

    With W processes the features of all of them are gathered, so each of the W*B images meets W*B captions.
    local_loss=False: every process computes the full (W*B, W*B) loss (identical on all processes).
    local_loss=True: a process only scores its own B rows against all W*B columns, labels offset by
    rank * B (open_clip's local loss): W times less logit memory; the mean over processes, which DDP's gradient
    averaging computes, is the same loss.
    gather_with_grad=True (the default) keeps gradients through the gather; this is what makes the gradient
    of the W-process run equal to a single process with a W times larger batch.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits_per_image (B', N), logits_per_text (B', N) and the target column of each row (B',)."""
        offset = 0
        if world_size() > 1:
            all_images = all_gather_features(image_embeds, self.gather_with_grad)  # (W*B, D)
            all_texts = all_gather_features(text_embeds, self.gather_with_grad)  # (W*B, D)
            if self.local_loss:
                logits_per_image = logit_scale * image_embeds @ all_texts.T  # (B, W*B)
                logits_per_text = logit_scale * text_embeds @ all_images.T  # (B, W*B)
                offset = rank() * image_embeds.shape[0]
            else:
                logits_per_image = logit_scale * all_images @ all_texts.T  # (W*B, W*B)
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_embeds @ text_embeds.T  # (B, B)
            logits_per_text = logit_scale * text_embeds @ image_embeds.T  # (B, B)
        if logit_bias is not None:  # a constant per row: no effect on cross-entropy, kept for parity
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = torch.arange(logits_per_image.shape[0], device=image_embeds.device) + offset  # (B',)
        return logits_per_image, logits_per_text, labels

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        logits_per_image, logits_per_text, labels = self.logits(image_embeds, text_embeds, logit_scale, logit_bias)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """-sum log sigmoid(z_ij * (t * x_i . y_j + b)) / B with z_ij = +1 on matching pairs and -1 elsewhere
    (SigLIP, Zhai et al. 2023, Algorithm 1). Every image / caption pair is an independent binary problem, so
    with several processes each one adds its images against the captions of every other process as negatives
    only (here: gathered with gradients, simpler than the paper's ring exchange). Normalised by the local batch
    size B as in the paper; DDP's mean over W processes then equals one process with a W*B batch.
    """

    @staticmethod
    def pair_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor | None, positives_on_diagonal: bool) -> torch.Tensor:
        logits = logit_scale * image_embeds @ text_embeds.T  # (B, B)
        if logit_bias is not None:
            logits = logits + logit_bias
        signs = -torch.ones_like(logits)  # (B, B): -1 = negative pair
        if positives_on_diagonal:
            signs = signs + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum() / image_embeds.shape[0]

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.pair_loss(image_embeds, text_embeds, logit_scale, logit_bias, positives_on_diagonal=True)
        if world_size() > 1:
            all_texts = all_gather_features(text_embeds, with_grad=True)  # (W*B, D)
            for other, texts in enumerate(all_texts.split(text_embeds.shape[0])):
                if other != rank():  # another process's captions: all negatives for our images
                    loss = loss + self.pair_loss(image_embeds, texts, logit_scale, logit_bias,
                                                 positives_on_diagonal=False)
        return loss


def build_loss(kind: LossKind, local_loss: bool = False, gather_with_grad: bool = True) -> nn.Module:
    """"clip" -> ClipLoss, "siglip" -> SigLipLoss (which always gathers with gradients)."""
    check_literal(kind, LossKind, "loss")
    if kind == "siglip":
        return SigLipLoss()
    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
