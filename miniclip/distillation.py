"""Knowledge distillation for CLIP: a student learns from a frozen teacher's view of the same batch, on top of (or
instead of) the contrastive loss. Three terms: TinyCLIP's affinity mimicking, open_clip's DistillClipLoss (kd), and
an embedding match (feature). Leaves out on purpose: teachers of other model families, multi-teacher ensembles and
intermediate-layer (hidden state / attention map) matching.

Shapes: image_embeds, text_embeds (B, D) student and (B, D_t) teacher, L2-normalised, per process; logit_scale and
teacher_logit_scale () multipliers (exp(t)). With W processes both models' features are gathered like ClipLoss's
(the student's with gradients, the teacher's without), so every row is a distribution over all W*B captions.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from miniclip.config import check_literal
from miniclip.loss import ClipLoss

DistillKind = Literal["affinity", "kd", "feature"]
FeatureDistance = Literal["cosine", "mse"]


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean_i KL(softmax(teacher_i) || softmax(student_i)) over the rows of (B', N) logits."""
    return F.kl_div(student_logits.log_softmax(dim=-1), teacher_logits.log_softmax(dim=-1), log_target=True,
                    reduction="batchmean")


def _soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_j softmax(teacher_i)_j log softmax(student_i)_j over the rows of (B', N) logits."""
    return -(teacher_logits.softmax(dim=-1) * student_logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def affinity_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                  teacher_logits_per_image: torch.Tensor, teacher_logits_per_text: torch.Tensor) -> torch.Tensor:
    """TinyCLIP's affinity mimicking (Wu et al., ICCV 2023, eq. 2-3): L = L_I2T + L_T2I with
    L_I2T = 1/B sum_i KL(A^t_I2T(i, :) || A^s_I2T(i, :)) and A_I2T(i, j) = softmax_j(s * <x_i, y_j>), each model at
    its own logit scale s; L_T2I the same over the text rows. The paper writes it as a cross-entropy; the KL differs
    by the teacher's entropy only (a constant: same gradient) and is 0 when the student mimics the teacher exactly."""
    return _kl_rows(teacher_logits_per_image, logits_per_image) + _kl_rows(teacher_logits_per_text, logits_per_text)


def kd_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
            teacher_logits_per_image: torch.Tensor, teacher_logits_per_text: torch.Tensor) -> torch.Tensor:
    """open_clip's `DistillClipLoss.dist_loss` (as in Chinese-CLIP's KD finetune): the cross-entropy of the student's
    rows against the teacher's probabilities, averaged over the two directions. Its gradient is half affinity's."""
    return (_soft_cross_entropy(teacher_logits_per_image, logits_per_image)
            + _soft_cross_entropy(teacher_logits_per_text, logits_per_text)) / 2


def feature_loss(embeds: torch.Tensor, teacher_embeds: torch.Tensor, distance: FeatureDistance = "cosine") -> torch.Tensor:
    """(B, D) student embeddings (already projected to D_t) vs (B, D_t) teacher ones: mean over samples of
    1 - cos (cosine) or mean squared difference over all elements (mse). Per sample, so nothing is gathered: the
    mean DDP takes over processes is the mean over the global batch."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(embeds, teacher_embeds, dim=-1)).mean()
    return F.mse_loss(embeds, teacher_embeds)


class DistillationLoss(nn.Module):
    """One distillation term between student and teacher outputs of the same batch.

    kind: "affinity" (TinyCLIP), "kd" (open_clip / Chinese-CLIP) or "feature" (embedding match). For "feature" with
    a teacher of another embed dim, a learnt linear `projection` (D -> D_t, then L2-normalised) maps the student's
    embeddings into the teacher's space; it trains with the student and is not part of it.
    local_loss / gather_with_grad: as ClipLoss (the logit kinds gather exactly like the contrastive loss).
    """

    def __init__(self, kind: DistillKind, student_dim: int, teacher_dim: int, feature_distance: FeatureDistance = "cosine",
                 local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        check_literal(kind, DistillKind, "distill_loss")
        check_literal(feature_distance, FeatureDistance, "distill_feature_distance")
        self.kind, self.feature_distance = kind, feature_distance
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False) \
            if kind == "feature" and student_dim != teacher_dim else None
        self.student_logits = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self.teacher_logits = ClipLoss(local_loss=local_loss, gather_with_grad=False)  # no gradient to send back

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image_embeds: torch.Tensor, teacher_text_embeds: torch.Tensor,
                teacher_logit_scale: torch.Tensor) -> torch.Tensor:
        if self.kind == "feature":
            return self.feature_term(image_embeds, text_embeds, teacher_image_embeds, teacher_text_embeds)
        dtype = image_embeds.dtype  # a bf16 / fp16 teacher meets the student's precision
        logits_per_image, logits_per_text, _ = self.student_logits.logits(image_embeds, text_embeds, logit_scale)
        teacher_per_image, teacher_per_text, _ = self.teacher_logits.logits(
            teacher_image_embeds.to(dtype), teacher_text_embeds.to(dtype), teacher_logit_scale.to(dtype))
        term = affinity_loss if self.kind == "affinity" else kd_loss
        return term(logits_per_image, logits_per_text, teacher_per_image, teacher_per_text)

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D_t): through the learnt projection when the dims differ, re-normalised like the teacher's."""
        return embeds if self.projection is None else F.normalize(self.projection(embeds), dim=-1)

    def feature_term(self, image_embeds, text_embeds, teacher_image_embeds, teacher_text_embeds) -> torch.Tensor:
        """The feature loss, averaged over the image and the text tower."""
        dtype = image_embeds.dtype
        return (feature_loss(self.project(image_embeds), teacher_image_embeds.to(dtype), self.feature_distance)
                + feature_loss(self.project(text_embeds), teacher_text_embeds.to(dtype), self.feature_distance)) / 2
