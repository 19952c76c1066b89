"""A feature cache on disk: embeddings saved as safetensors next to a JSON key saying exactly what made them
(the model's weights hash, its config, the autocast dtype, the preprocessing, and the data), so a later run reuses
them only when all of that matches.

Policy on a mismatch: a clear `FeatureCacheError` naming what differs (model / config / data ...), never a silent
reuse; pass overwrite=True (test.py: --overwrite_features) to recompute and replace. Leaves out on purpose:
approximate-nearest-neighbour indexes; the files are plain tensors anyone can load.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from miniclip.files import atomic_write_text, save_safetensors

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


class FeatureCacheError(ValueError):
    """A cached feature file that does not belong to this model / data, or cannot be read."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): the checkpoint's identity by content,
    so two paths to the same weights match and a retrained checkpoint at the same path does not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[str | Path]) -> str:
    """sha256 over (absolute path, size, modification time) of each file, in order."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path).resolve()
        try:
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    # JSON, not "\n".join: ["a\nb"] and ["a", "b"] must differ
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _short(value) -> str:
    if isinstance(value, dict):  # a model config: its name says most
        return repr(value.get("name", "{...}"))
    return repr(value[:12] + "...") if isinstance(value, str) and len(value) > 16 else repr(value)


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


def cached_features(cache_dir: str | Path | None, name: str, key: dict, compute: Callable[[], dict],
                    overwrite: bool = False) -> dict[str, torch.Tensor]:
    """`compute()` -> dict of tensors, saved as `cache_dir/name.safetensors` (+ `name.json`: the key), or loaded from
    there when the stored key equals `key`. Without a cache_dir this just calls compute()."""
    if cache_dir is None:
        return compute()
    cache_dir = Path(cache_dir)
    tensors_path, key_path = cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json"
    key = json.loads(json.dumps({"format_version": FORMAT_VERSION, **key}))  # normalise (tuples -> lists)
    if tensors_path.exists() and not overwrite:
        try:
            stored = json.loads(key_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FeatureCacheError(f"feature cache {tensors_path} has no readable key file {key_path} ({e}). "
                                    "Delete both, or pass --overwrite_features to recompute.") from None
        differ = _differences(stored, key)
        if differ:
            detail = "; ".join(f"{k}: stored {_short(stored.get(k))}, now {_short(key.get(k))}" for k in differ)
            raise FeatureCacheError(
                f"feature cache {tensors_path} was made with a different {' and '.join(differ)} ({detail}). "
                "Use another --save_features directory, or pass --overwrite_features to recompute and replace it.")
        logger.info("reusing features from %s", tensors_path)
        try:
            return load_file(tensors_path)
        except Exception as e:  # safetensors raises its own error types for truncated / foreign files
            raise FeatureCacheError(f"cannot read feature cache {tensors_path}: {e}. Pass --overwrite_features "
                                    "to recompute it.") from None
    tensors = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Tensors first, key last: a key file only ever describes tensors that were completely written.
    if key_path.exists():
        key_path.unlink()
    save_safetensors(tensors, tensors_path)
    atomic_write_text(key_path, json.dumps(key, indent=1, ensure_ascii=False))
    logger.info("saved features to %s", tensors_path)
    return tensors
