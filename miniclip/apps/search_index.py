"""Image search index for the demo: the normalised image embeddings of a caption set or an image folder, built once
with a progress bar, cached on disk (features.py) under a key made of the model's weights and config and the image
files' paths, sizes and mtimes, and searched by exact top-k cosine similarity (torch; faiss's flat index if installed).

Leaves out on purpose: approximate indexes (IVF, HNSW) and incremental updates; a changed image set is re-encoded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from miniclip.config import check_literal
from miniclip.data.captions import read_caption_file
from miniclip.evaluation.encode import Encoder
from miniclip.evaluation.feature_cache import FeatureCacheError, cached_features, files_fingerprint, model_fingerprint

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FAISS_MIN_IMAGES = 50_000  # below this, torch's matmul + topk is as fast and one dependency fewer
SearchBackend = Literal["auto", "torch", "faiss"]


@dataclass
class ImageSet:
    """The images to search and what to show under each: caption-file captions, or the file name for a folder."""
    images: list[Path]
    captions: list[tuple[str, ...]]
    missing: list[Path] = field(default_factory=list)  # listed in the caption file but not on disk


def _folder_images(folder: Path) -> ImageSet:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return ImageSet(images, [(p.stem,) for p in images])


def read_image_set(data: str | Path, image_root: str | Path | None = None) -> ImageSet:
    """A caption file (captions.py formats) or a folder of images. Listed images missing on disk are set aside in
    `missing` (the demo reports the count); none present at all is an error."""
    data = Path(data)
    if data.is_dir():
        return _folder_images(data)
    # Served to whoever opens the page: only images under the root (an image listed twice is one record).
    records = read_caption_file(data, image_root=image_root, check_files=False, confine_to_root=True)
    captions = {record.image: record.captions for record in records}
    present = [p for p in captions if p.is_file()]
    missing = [p for p in captions if not p.is_file()]
    if not present:
        raise FileNotFoundError(
            f"{data}: none of its {len(missing)} images exist (first: {missing[0]}). Image paths are relative to "
            "the caption file's folder; pass --image_root to point elsewhere.")
    return ImageSet(present, [tuple(captions[p]) for p in present], missing)


# --- index ------------------------------------------------------------------------------------------------------
@dataclass
class SearchIndex:
    images: list[Path]  # indexed (readable) images, row order of image_embeds
    captions: list[tuple[str, ...]]
    image_embeds: torch.Tensor  # (N, D) float32, L2-normalised
    missing: list[Path] = field(default_factory=list)  # listed in the caption file, not on disk
    unreadable: list[Path] = field(default_factory=list)  # on disk, but PIL cannot decode them
    from_cache: bool = False
    seconds: float = 0.0  # time to build or load
    _faiss_index: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def search(self, query_embeds: torch.Tensor, k: int, backend: SearchBackend = "auto") -> list[tuple[int, float]]:
        """Exact top-k by cosine similarity -> [(row, score)], best first; k is clamped to 1..len(self)."""
        check_literal(backend, SearchBackend, "backend")
        query = torch.nn.functional.normalize(query_embeds.detach().float().cpu().reshape(1, -1), dim=-1)  # (1, D)
        if query.shape[1] != self.image_embeds.shape[1]:
            raise ValueError(f"query has {query.shape[1]} dims, the index {self.image_embeds.shape[1]}: "
                             "was the index built with another model?")
        k = max(1, min(int(k), len(self)))
        if backend == "faiss" or (backend == "auto" and len(self) >= FAISS_MIN_IMAGES and _has_faiss()):
            scores, rows = self._faiss().search(query.numpy(), k)  # (1, k) each
            scores, rows = torch.from_numpy(scores[0]), torch.from_numpy(rows[0])
        else:
            scores, rows = torch.topk(self.image_embeds @ query[0], k)  # (k,)
        return [(int(r), float(s)) for r, s in zip(rows, scores)]

    def _faiss(self):
        if self._faiss_index is None:
            import faiss
            self._faiss_index = faiss.IndexFlatIP(self.image_embeds.shape[1])  # exact inner product
            self._faiss_index.add(self.image_embeds.numpy())
        return self._faiss_index


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def index_key(model, image_set: ImageSet) -> dict:
    """What the embeddings depend on: the weights (by content), the config (incl. preprocessing) and the image files
    (path, size, mtime). The cache file is named after this key, so a changed model or folder gets a new file."""
    return {"kind": "search_index", "model": model_fingerprint(model), "config": model.config.to_dict(),
            "images": files_fingerprint(image_set.images)}


def build_index(encoder: Encoder, image_set: ImageSet, cache_dir: str | Path | None = None,
                rebuild: bool = False) -> SearchIndex:
    """Load the cached index for (model weights, image files), else encode every image (unreadable files are
    skipped and counted) and cache the result. cache_dir=None encodes without caching."""
    start, computed = time.perf_counter(), []

    def compute() -> dict[str, torch.Tensor]:
        computed.append(True)
        image_embeds, kept = encoder.image_files(image_set.images, skip_unreadable=True)
        return {"image_embeds": image_embeds, "kept": kept}  # (N, D), (N,) rows of image_set.images

    key = index_key(encoder.model, image_set)
    name = "index-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    try:
        tensors = cached_features(cache_dir, name, key, compute, overwrite=rebuild)
    except FeatureCacheError as e:  # a truncated or foreign cache file: rebuilding is always safe here
        logger.warning("%s; rebuilding the index", e)
        tensors = cached_features(cache_dir, name, key, compute, overwrite=True)
    kept = tensors["kept"].tolist()
    unreadable = sorted(set(range(len(image_set.images))) - set(kept))
    return SearchIndex(images=[image_set.images[i] for i in kept], captions=[image_set.captions[i] for i in kept],
                       image_embeds=tensors["image_embeds"], missing=image_set.missing,
                       unreadable=[image_set.images[i] for i in unreadable], from_cache=not computed,
                       seconds=time.perf_counter() - start)
