"""metrics.py against naive per-query Python references (stable sorts), clip_benchmark's recall definition written
out independently, and the tutorial's published numbers on real TinyCLIP embeddings."""
import statistics

import numpy as np
import pytest
import torch

from miniclip.evaluation import metrics
from miniclip.evaluation.metrics import (first_caption_indices, first_caption_retrieval, per_class_accuracy, retrieval_metrics,
                              zeroshot_metrics)


# --- naive references --------------------------------------------------------------------------------------------
def stable_order(row):
    """Gallery indices best first; Python's sort is stable, so equal scores keep index order (earlier first)."""
    return sorted(range(len(row)), key=lambda j: -row[j])


def naive_retrieval(image_embeds, text_embeds, text_to_image, ks=(1, 5, 10)):
    images, texts = image_embeds.tolist(), text_embeds.tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    t2i = [stable_order([dot(t, im) for im in images]).index(text_to_image[i]) for i, t in enumerate(texts)]
    i2t = []
    for i, im in enumerate(images):
        order = stable_order([dot(im, t) for t in texts])
        i2t.append(min(pos for pos, j in enumerate(order) if text_to_image[j] == i))
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100 * sum(r < k for r in ranks) / len(ranks)
        out[f"{name}_median_rank"] = statistics.median_low([r + 1 for r in ranks])  # torch.median: lower median
    recalls = [v for key, v in out.items() if "_R@" in key]
    out["mean_recall"] = sum(recalls) / len(recalls)
    return out


def naive_zeroshot(image_embeds, classifier, labels, ks=(1, 5)):
    ranks = []
    for im, label in zip(image_embeds.tolist(), labels):
        scores = [sum(x * y for x, y in zip(im, c)) for c in classifier.tolist()]
        ranks.append(stable_order(scores).index(label))
    out = {f"zeroshot_top{k}": 100 * sum(r < k for r in ranks) / len(ranks) for k in ks}
    per_class = [100 * sum(r == 0 for r, lab in zip(ranks, labels) if lab == c) / labels.count(c)
                 for c in sorted(set(labels))]
    out["zeroshot_mean_per_class"] = sum(per_class) / len(per_class)
    return out


def clip_benchmark_recall(scores, positives, k):
    """clip_benchmark's retrieval recall@k (LAION-AI/CLIP_benchmark, metrics/zeroshot_retrieval.py), as its comments
    define it: a query scores 1 when at least one of its positives is among its k highest-scoring candidates.
    scores (Q, G) numpy, positives: one set of gallery indices per query. Valid without ties (its top-k order
    among equal scores is unspecified)."""
    hits = [bool(set(np.argsort(-row, kind="stable")[:k].tolist()) & pos) for row, pos in zip(scores, positives)]
    return 100 * sum(hits) / len(hits)


# --- data ----------------------------------------------------------------------------------------------------------
def random_set(n_images=23, captions=(1, 2, 3, 5), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = [captions[i % len(captions)] for i in range(n_images)]
    text_to_image = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = torch.randperm(len(text_to_image), generator=g).tolist()  # captions not grouped by image
    text_to_image = [text_to_image[p] for p in perm]
    image_embeds = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    return image_embeds, text_embeds, text_to_image


def tied_set(n_images=30, n_texts=70, seed=1):
    """Integer embeddings in {-1, 0, 1}^3 (dot products exact in float32) with repeated rows: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.randint(-1, 2, (n_images, 3), generator=g).float()
    image_embeds[1::4] = image_embeds[0::4][: len(image_embeds[1::4])]  # identical images -> tied columns
    text_embeds = torch.randint(-1, 2, (n_texts, 3), generator=g).float()
    text_to_image = list(range(n_images)) + torch.randint(0, n_images, (n_texts - n_images,), generator=g).tolist()
    return image_embeds, text_embeds, text_to_image


# --- retrieval -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [random_set, tied_set])
def test_retrieval_equals_naive_reference(make):
    image_embeds, text_embeds, text_to_image = make()
    got = retrieval_metrics(image_embeds, text_embeds, torch.tensor(text_to_image))
    assert got == pytest.approx(naive_retrieval(image_embeds, text_embeds, text_to_image))


def test_ties_are_resolved_earlier_index_first():
    # Two identical images; caption 0 belongs to image 1, caption 1 to image 0.
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = retrieval_metrics(image_embeds, text_embeds, torch.tensor([1, 0, 2]), ks=(1,))
    # caption 0 -> image 1 ties with image 0, which comes first: rank 2. caption 1 -> image 0: rank 1.
    assert metrics.text_to_image_ranks(image_embeds, text_embeds, torch.tensor([1, 0, 2])).tolist() == [1, 0, 0]
    assert got["t2i_R@1"] == pytest.approx(200 / 3)
    # image 1 ties captions 0 and 1; its own caption 0 comes first: rank 1. Image 0's caption 1 is second: rank 2.
    assert metrics.image_to_text_ranks(image_embeds, text_embeds, torch.tensor([1, 0, 2])).tolist() == [1, 0, 0]


def test_chunked_equals_unchunked(monkeypatch):
    image_embeds, text_embeds, text_to_image = tied_set(n_images=40, n_texts=120)
    whole = retrieval_metrics(image_embeds, text_embeds, torch.tensor(text_to_image))
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 50)  # 1-2 query rows per chunk
    assert retrieval_metrics(image_embeds, text_embeds, torch.tensor(text_to_image)) == whole


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_equals_clip_benchmark_definition(seed):
    image_embeds, text_embeds, text_to_image = random_set(n_images=40, seed=seed)
    got = retrieval_metrics(image_embeds, text_embeds, torch.tensor(text_to_image))
    scores = (text_embeds.double() @ image_embeds.double().T).numpy()  # random floats: no ties
    captions_of = [{j for j, im in enumerate(text_to_image) if im == i} for i in range(len(image_embeds))]
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(clip_benchmark_recall(scores, [{t} for t in text_to_image], k))
        assert got[f"i2t_R@{k}"] == pytest.approx(clip_benchmark_recall(scores.T, captions_of, k))


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text_to_image has 1 entries for 2 captions"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0]))


# --- tutorial protocol ---------------------------------------------------------------------------------------------
def test_first_caption_indices():
    assert first_caption_indices(torch.tensor([1, 0, 0, 2, 1])).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match=r"images \[1\]"):
        first_caption_indices(torch.tensor([0, 2]))


def test_first_caption_protocol_equals_naive():
    image_embeds, text_embeds, _ = tied_set(n_images=30, n_texts=30)
    got = first_caption_retrieval(image_embeds, text_embeds)
    ref = naive_retrieval(image_embeds, text_embeds, list(range(30)), ks=(1, 3, 5, 10))
    assert got == pytest.approx({f"first_caption_t2i_R@{k}": ref[f"t2i_R@{k}"] for k in (1, 3, 5, 10)})


def test_tutorial_numbers_reproduce(shared_data):
    folder = shared_data / "tinyclip-features"
    image_embeds = torch.from_numpy(np.load(folder / "en_val_image.npy"))
    text_embeds = torch.from_numpy(np.load(folder / "en_val_text.npy"))
    got = first_caption_retrieval(image_embeds, text_embeds)
    assert [round(got[f"first_caption_t2i_R@{k}"], 1) for k in (1, 3, 5, 10)] == [52.0, 70.5, 78.5, 86.3]


# --- zero-shot -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_zeroshot_equals_naive_reference(tied):
    g = torch.Generator().manual_seed(3)
    if tied:
        image_embeds = torch.randint(-1, 2, (60, 3), generator=g).float()
        classifier = torch.randint(-1, 2, (7, 3), generator=g).float()
        classifier[3] = classifier[1]  # two identical classes
    else:
        image_embeds = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=-1)
        classifier = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    labels = torch.randint(0, 6, (60,), generator=g).tolist()  # class 6 has no image: left out of the mean
    got = zeroshot_metrics(image_embeds, classifier, torch.tensor(labels))
    assert got == pytest.approx(naive_zeroshot(image_embeds, classifier, labels))
    per_class = per_class_accuracy(image_embeds, classifier, torch.tensor(labels))
    assert torch.isnan(per_class[6]) and per_class[:6].mean().item() == pytest.approx(got["zeroshot_mean_per_class"])


def test_zeroshot_hand_computed():
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # classes 0 and 2 identical
    image_embeds = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    got = zeroshot_metrics(image_embeds, classifier, torch.tensor([0, 2, 1, 0]), ks=(1, 2))
    # image 1 (class 2) ties class 0, which wins; image 3 (class 0) prefers class 1.
    assert got["zeroshot_top1"] == pytest.approx(50.0)
    assert got["zeroshot_top2"] == pytest.approx(100.0)  # both misses are second
    assert got["zeroshot_mean_per_class"] == pytest.approx((50 + 100 + 0) / 3)


def test_zeroshot_bad_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        zeroshot_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))
