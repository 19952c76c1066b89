"""Reading checkpoint files without running their code.

safetensors through `safe_open` (memory-mapped), PyTorch pickles through `torch.load(weights_only=True, mmap=True)`,
TorchScript archives (OpenAI's `ViT-B-32.pt`) through `torch.jit.load`, keeping only their state dict. Leaves out on
purpose: numpy / JAX (big_vision) files, sharded checkpoints, and anything that needs `pickle` to run code by default.
"""
from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

# Entries of OpenAI's TorchScript state dicts that are not weights (0-dim tensors or ints): the model is derived
# from shapes instead.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Keys of a training checkpoint that wrap the state dict, in the order they are tried.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
# The only classes a weights_only read may rebuild beyond tensors and containers: argparse's Namespace (TinyCLIP's
# training checkpoints pickle their "args" as one) only sets attributes, running no code. Never widened to arbitrary
# classes: anything else still needs allow_unsafe_pickle=True.
SAFE_PICKLE_TYPES = [argparse.Namespace]
# Entries of a training checkpoint kept beside its weights for what they say about the run (Checkpoint.run).
RUN_ENTRIES = ("name", "epoch", "args")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, of an unknown layout, or not fitting the model."""


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save / TorchScript), 'pickle' (legacy torch.save) or 'unknown', from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (`<name>/code/...`) and `constants.pkl`; torch.save zips do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is a damaged zip archive (truncated download?): {e}. "
                              "Fix: download or copy the file again.") from None
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> tuple[Any, str]:
    """The object stored in `path` and how it was read ('safetensors', 'pickle', 'torchscript')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy was interrupted. "
                              "Fix: download or copy the file again.")
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path), "safetensors"
    if kind == "zip" and _is_torchscript(path):
        return _read_torchscript(path), "torchscript"
    if kind in ("zip", "pickle"):
        return _read_pickle(path, allow_unsafe_pickle), "pickle"
    raise CheckpointError(f"{path} is not a checkpoint: expected a safetensors file, a PyTorch .pt/.bin/.pth "
                          "(torch.save) or a TorchScript archive; its first bytes match none of them.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped; one tensor read at a time
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {e}. "
                              "Fix: download or copy the file again.") from None


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        # TorchScript code only runs when a method is called; loading executes no Python.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still the only reader
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is a TorchScript archive that could not be loaded: {e}") from None
    return dict(module.state_dict())


def _read_pickle(path: Path, allow_unsafe_pickle: bool) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_TYPES):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped; other errors are real
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_unsafe_pickle:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} is a pickle that needs arbitrary Python objects to load ({first_line}); unpickling them can "
                "run code, so it was refused. If you trust the file, pass allow_unsafe_pickle=True.") from None
        return _read_unsafe_pickle(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (truncated or not a checkpoint?): "
                              f"{type(e).__name__}: {e}. Fix: download or copy the file again.") from None


def _read_unsafe_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} could not be unpickled even with allow_unsafe_pickle=True: "
                              f"{type(e).__name__}: {e}") from None


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a training checkpoint: `{"state_dict": ...}` / `{"model": ...}` wrappers unwrapped
    (their optimizer / epoch siblings dropped), a whole nn.Module reduced to its state dict, `module.` removed."""
    if isinstance(obj, torch.nn.Module):  # only reachable with allow_unsafe_pickle=True
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    if not obj:
        raise CheckpointError(f"{path} holds an empty state dict")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a dict without tensors (keys: {sorted(map(str, obj))[:8]}); "
                              f"expected a state dict, possibly under one of {list(WRAPPER_KEYS)}")
    keys = [str(k) for k in obj]
    # DistributedDataParallel saves every key under `module.`; strip it only when all keys have it.
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def run_entries(obj: Any) -> dict[str, Any]:
    """What a training checkpoint says about its run beside the weights (open_clip_train's `name`, TinyCLIP's
    `args` Namespace as a dict, `epoch`); {} for a bare state dict."""
    if not isinstance(obj, dict) or not any(isinstance(obj.get(k), dict) for k in WRAPPER_KEYS):
        return {}
    run = {k: obj[k] for k in RUN_ENTRIES if k in obj}
    if isinstance(run.get("args"), argparse.Namespace):
        run["args"] = vars(run["args"])
    return run


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors header (miniclip tags its files with layout=miniclip)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {e}") from None
