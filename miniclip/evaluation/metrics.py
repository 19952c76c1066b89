"""Retrieval metrics over L2-normalised embeddings, several captions per image, computed in chunks so that
100k captions x 20k images fit in bounded memory on a CPU.

Ranks: a query's rank is the number of candidates that score strictly higher than its target, plus the number that
tie with it and come earlier in the gallery (the order a stable descending sort gives). Ties are thus resolved
deterministically and never in the query's favour twice. Zero-shot classification ranks classes the same way
(earlier class index first). Leaves out on purpose: mAP and other ranking metrics.
"""
from __future__ import annotations

import re

import torch

DEFAULT_KS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 24  # scores held at once: 16M floats = 64 MB
_RECALL = re.compile(r"(?:^|_)(?:t2i|i2t)_R@\d+$")


def is_recall(key: str) -> bool:
    """A recall in percent, however prefixed: t2i_R@5, eval_i2t_R@10, eval_mean_recall, first_caption_t2i_R@1."""
    return bool(_RECALL.search(key)) or key.endswith("mean_recall")


def is_retrieval_metric(key: str) -> bool:
    """A recall or a median rank (what retrieval reports)."""
    return is_recall(key) or key.endswith("median_rank")


def _chunk_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(1, n_cols)))


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (C, N), target (C,) column index -> 0-based rank (C,) with earlier-index-first tie breaking."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target].unsqueeze(1)  # (C, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    earlier = columns.unsqueeze(0) < target.unsqueeze(1)  # (C, N)
    return (scores > target_score).sum(1) + ((scores == target_score) & earlier).sum(1)


def _score_chunks(queries: torch.Tensor, gallery: torch.Tensor):
    """(start, scores (C, N_gallery)) for consecutive chunks of queries, so memory stays bounded."""
    step = _chunk_rows(len(queries), len(gallery))
    for start in range(0, len(queries), step):
        yield start, queries[start:start + step] @ gallery.T


def text_to_image_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        text_to_image: torch.Tensor) -> torch.Tensor:
    """Each caption queries the image gallery; its target is its own image. Returns 0-based ranks (N_txt,)."""
    return torch.cat([_rank_of(scores, text_to_image[start:start + len(scores)])
                      for start, scores in _score_chunks(text_embeds, image_embeds)])


def image_to_text_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                        text_to_image: torch.Tensor) -> torch.Tensor:
    """Each image queries the caption gallery; its rank is that of its best-ranked own caption. (N_img,)"""
    ranks = []
    for start, scores in _score_chunks(image_embeds, text_embeds):  # scores (C, N_txt)
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
    return {k: (ranks < k).double().mean().item() * 100 for k in ks}  # float64: 52.0, not 51.99999


@torch.no_grad()
def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                      ks=DEFAULT_KS) -> dict[str, float]:
    """Recall@k (percent) both ways, their mean (`mean_recall`), and median ranks (1-based; for an even count the
    lower of the two middle ranks, as torch.median gives).

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
    recalls = [v for k, v in metrics.items() if is_recall(k)]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


def first_caption_indices(text_to_image: torch.Tensor) -> torch.Tensor:
    """The index of each image's first caption (N_img,), for the tutorial's one-caption-per-image protocol."""
    text_to_image = torch.as_tensor(text_to_image).long()
    n_images = int(text_to_image.max()) + 1
    positions = torch.arange(len(text_to_image))
    # scatter_reduce "amin" keeps the smallest caption position per image; images without a caption stay at len().
    first = torch.full((n_images,), len(text_to_image), dtype=torch.long)
    first = first.scatter_reduce(0, text_to_image, positions, reduce="amin")
    if (first == len(text_to_image)).any():
        missing = (first == len(text_to_image)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"images {missing} have no caption in text_to_image; every image needs at least one")
    return first


TUTORIAL_KS = (1, 3, 5, 10)


@torch.no_grad()
def first_caption_retrieval(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                            ks=TUTORIAL_KS) -> dict[str, float]:
    """The tutorial's protocol: text i (the first caption of image i) queries the images; text->image top-k (percent).

    image_embeds (N, D), text_embeds (N, D), row i of each describing the same sample. Keys `first_caption_t2i_R@k`.
    """
    if len(image_embeds) != len(text_embeds):
        raise ValueError(f"one caption per image expected: {len(image_embeds)} images, {len(text_embeds)} texts")
    target = torch.arange(len(text_embeds), device=text_embeds.device)
    ranks = text_to_image_ranks(image_embeds.float(), text_embeds.float(), target)
    return {f"first_caption_t2i_R@{k}": v for k, v in recall_at(ranks, ks).items()}


@torch.no_grad()
def zeroshot_metrics(image_embeds: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                     ks=(1, 5)) -> dict[str, float]:
    """Zero-shot classification accuracy (percent): top-k for each k, and the mean over classes of top-1 per-class
    accuracy (`zeroshot_mean_per_class`, i.e. balanced accuracy; classes absent from `labels` are left out).

    image_embeds (N, D), classifier (C, D) one normalised text embedding per class, labels (N,) in [0, C).
    A class tying with the true one counts as above it when its index is lower (see the module docstring).
    """
    labels = torch.as_tensor(labels, device=image_embeds.device).long()
    n_classes = len(classifier)
    if len(labels) != len(image_embeds):
        raise ValueError(f"{len(labels)} labels for {len(image_embeds)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]")
    ranks = text_to_image_ranks(classifier.float(), image_embeds.float(), labels)  # (N,) rank of the true class
    metrics = {f"zeroshot_top{k}": v for k, v in recall_at(ranks, ks).items() if k <= n_classes}
    hits = (ranks == 0).double()
    per_class_hits = torch.zeros(n_classes, dtype=torch.float64, device=hits.device).index_add_(0, labels, hits)
    per_class_count = torch.bincount(labels, minlength=n_classes).double()
    present = per_class_count > 0
    metrics["zeroshot_mean_per_class"] = (per_class_hits[present] / per_class_count[present]).mean().item() * 100
    return metrics


def per_class_accuracy(image_embeds: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (percent) of each class (C,); NaN for classes with no image."""
    labels = torch.as_tensor(labels).long()
    ranks = text_to_image_ranks(classifier.float(), image_embeds.float(), labels)
    hits = torch.zeros(len(classifier), dtype=torch.float64).index_add_(0, labels, (ranks == 0).double())
    return hits / torch.bincount(labels, minlength=len(classifier)).double() * 100
