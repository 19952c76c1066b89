"""Retrieval metrics over L2-normalised embeddings, several captions per image, computed in chunks so that
100k captions x 20k images fit in bounded memory on a CPU.

Ranks: a query's rank is the number of candidates that score strictly higher than its target, plus the number that
tie with it and come earlier in the gallery (the order a stable descending sort gives). Ties are thus resolved
deterministically and never in the query's favour twice. Leaves out on purpose: mAP and other ranking metrics.
"""
from __future__ import annotations

import torch

DEFAULT_KS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 24  # scores held at once: 16M floats = 64 MB


def _chunk_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(1, n_cols)))


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (C, N), target (C,) column index -> 0-based rank (C,) with earlier-index-first tie breaking."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target].unsqueeze(1)  # (C, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    earlier = columns.unsqueeze(0) < target.unsqueeze(1)  # (C, N)
    return (scores > target_score).sum(1) + ((scores == target_score) & earlier).sum(1)


def text_to_image_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        text_to_image: torch.Tensor) -> torch.Tensor:
    """Each caption queries the image gallery; its target is its own image. Returns 0-based ranks (N_txt,)."""
    ranks = []
    step = _chunk_rows(len(text_embeds), len(image_embeds))
    for start in range(0, len(text_embeds), step):
        scores = text_embeds[start:start + step] @ image_embeds.T  # (C, N_img)
        ranks.append(_rank_of(scores, text_to_image[start:start + step]))
    return torch.cat(ranks)


def image_to_text_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        text_to_image: torch.Tensor) -> torch.Tensor:
    """Each image queries the caption gallery; its rank is that of its best-ranked own caption. (N_img,)"""
    ranks = []
    step = _chunk_rows(len(image_embeds), len(text_embeds))
    for start in range(0, len(image_embeds), step):
        scores = image_embeds[start:start + step] @ text_embeds.T  # (C, N_txt)
        image_ids = torch.arange(start, start + len(scores), device=scores.device)
        positive = text_to_image.unsqueeze(0) == image_ids.unsqueeze(1)  # (C, N_txt)
        if not positive.any(1).all():
            missing = image_ids[~positive.any(1)][:5].tolist()
            raise ValueError(f"images {missing} have no caption in text_to_image; every image needs at least one")
        # The best-ranked positive is the highest-scoring one, the earliest among equals: argmax returns the first.
        best = scores.masked_fill(~positive, float("-inf")).argmax(1)  # (C,)
        ranks.append(_rank_of(scores, best))
    return torch.cat(ranks)


def recall_at(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[int, float]:
    return {k: (ranks < k).float().mean().item() * 100 for k in ks}


@torch.no_grad()
def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                      ks=DEFAULT_KS) -> dict[str, float]:
    """Recall@k (percent) both ways, their mean (`mean_recall`), and median ranks (1-based).

    image_embeds (N_img, D) and text_embeds (N_txt, D) L2-normalised; text_to_image (N_txt,) the image of each caption.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    text_to_image = torch.as_tensor(text_to_image, device=text_embeds.device).long()
    if len(text_to_image) != len(text_embeds):
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {len(text_embeds)} captions")
    t2i = text_to_image_ranks(image_embeds, text_embeds, text_to_image)
    i2t = image_to_text_ranks(image_embeds, text_embeds, text_to_image)
    metrics = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k, value in recall_at(ranks, ks).items():
            metrics[f"{direction}_R@{k}"] = value
        metrics[f"{direction}_median_rank"] = (ranks.float() + 1).median().item()
    recalls = [v for k, v in metrics.items() if "_R@" in k]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics
