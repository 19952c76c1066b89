"""Files every part of miniclip writes or reads: atomic writes (a crash never leaves half a file under the final
name), JSON / YAML mapping files with one-line errors, and the cache folder.

Leaves out on purpose: remote paths (fsspec) and file locking; concurrent writers each write a whole file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_ENV = "MINICLIP_CACHE"  # overrides ~/.cache/miniclip for every cache (synthetic set, features, demo index)
MAPPING_SUFFIXES = (".json", ".yaml", ".yml")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it over `path` (os.replace is atomic on POSIX
    and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Atomically write `state` as safetensors (contiguous, unshared CPU copies where needed)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_mapping_file(path: str | Path, what: str = "file") -> dict:
    """A JSON or YAML file (by suffix; anything else is read as JSON) holding one mapping. Raises ValueError (or
    FileNotFoundError) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON / YAML object (a mapping), not {type(data).__name__}")
    return data


def cache_dir(sub: str = "") -> Path:
    """$MINICLIP_CACHE/<sub>, else $XDG_CACHE_HOME/miniclip/<sub>, else ~/.cache/miniclip/<sub>: the one place
    miniclip caches things."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "miniclip"
    return root / sub if sub else root
