"""evaluation/feature_cache.py: the cache round trip on real files, its key (model content, data), and its refusals."""
import json

import pytest
import torch

from miniclip import MiniClip
from miniclip.evaluation.feature_cache import (FeatureCacheError, cached_features, files_fingerprint, model_fingerprint,
                               texts_fingerprint)


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return {"embeds": value.clone()}
    return compute, calls


def test_round_trip_and_reuse(tmp_path):
    value = torch.randn(5, 3)
    compute, calls = counting(value)
    key = {"model": "abc", "data": "d1"}
    first = cached_features(tmp_path, "val_images", key, compute)
    again = cached_features(tmp_path, "val_images", key, compute)
    assert len(calls) == 1 and torch.equal(first["embeds"], value) and torch.equal(again["embeds"], value)
    assert json.loads((tmp_path / "val_images.json").read_text())["model"] == "abc"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    assert cached_features(None, "x", key, compute)["embeds"].shape == (5, 3) and len(calls) == 2


def test_mismatch_errors_or_recomputes(tmp_path):
    compute, calls = counting(torch.zeros(2, 2))
    cached_features(tmp_path, "f", {"model": "aaaa", "data": "d"}, compute)
    with pytest.raises(FeatureCacheError, match=r"different model \(model: stored 'aaaa', now 'bbbb'\)"):
        cached_features(tmp_path, "f", {"model": "bbbb", "data": "d"}, compute)
    with pytest.raises(FeatureCacheError, match="different data"):
        cached_features(tmp_path, "f", {"model": "aaaa", "data": "other"}, compute)
    new, _ = counting(torch.ones(2, 2))
    assert torch.equal(cached_features(tmp_path, "f", {"model": "bbbb", "data": "d"}, new, overwrite=True)["embeds"],
                       torch.ones(2, 2))
    assert torch.equal(cached_features(tmp_path, "f", {"model": "bbbb", "data": "d"}, compute)["embeds"],
                       torch.ones(2, 2))


def test_unreadable_cache_files(tmp_path):
    compute, _ = counting(torch.zeros(2))
    cached_features(tmp_path, "f", {"model": "a"}, compute)
    (tmp_path / "f.safetensors").write_bytes(b"garbage")
    with pytest.raises(FeatureCacheError, match="cannot read feature cache .*f.safetensors"):
        cached_features(tmp_path, "f", {"model": "a"}, compute)
    (tmp_path / "f.json").unlink()
    with pytest.raises(FeatureCacheError, match="no readable key file"):
        cached_features(tmp_path, "f", {"model": "a"}, compute)


def test_model_fingerprint_follows_weights():
    torch.manual_seed(0)
    a = MiniClip("tiny-vit")
    torch.manual_seed(0)
    b = MiniClip("tiny-vit")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.logit_scale.logit_scale.add_(1e-3)  # a 0-d parameter changes too
    assert model_fingerprint(a) != model_fingerprint(b)


def test_data_fingerprints(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"1")
    before = files_fingerprint([path])
    path.write_bytes(b"12")
    assert files_fingerprint([path]) != before
    assert len({texts_fingerprint(t) for t in (["a", "b"], ["a\nb"], ["a b"], ["ab"], ["b", "a"])}) == 5
    assert texts_fingerprint(["a", "b"]) == texts_fingerprint(("a", "b"))
