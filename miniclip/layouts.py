"""Checkpoint layouts: which project saved a file or folder, and its tensors renamed to MiniClip's names.

miniclip's own folder and the tutorial's Trainer output, TinyCLIP `.pt`, open_clip (state dict or hub folder),
OpenAI TorchScript, Hugging Face CLIPModel / ChineseCLIPModel folders (convert_hf.py), Chinese-CLIP `.pt`
(convert_chinese.py). Validation lives in checkpoints.py. Leaves out on purpose: TinyCLIP's pruned
"auto-inheritance" checkpoints (per-layer shapes MiniClip cannot build), timm / HF-hub towers, sharded files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .checkpoint_io import (OPENAI_EXTRA_KEYS, CheckpointError, read_checkpoint, unwrap_state_dict)
from .config import ClipConfig
from .infer import config_from_open_clip


Format = Literal["auto", "miniclip", "tinyclip", "open_clip", "openai", "hf_clip", "cn_clip", "hf_chinese_clip"]
ExportFormat = Literal["miniclip", "hf", "open_clip"]

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "model_config.json", "tokenizer_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

# Checkpoint entries that are allowed to go unused, and why (anything else unused is an error):
IGNORABLE = {
    "input_resolution / context_length / vocab_size": "OpenAI TorchScript metadata, not weights",
    "*position_ids, *token_type_ids": "index buffers that Hugging Face models rebuild (older files saved them)",
    "*bert.pooler.*": "the BERT pooler, which Chinese-CLIP never uses ([CLS] state @ text_projection instead)",
    "*attn_mask": "the causal text mask, rebuilt from context_length",
}
# Model entries that may be absent from a checkpoint: BatchNorm's step counter (only used with momentum=None;
# OpenAI's RN50 files predate it), left at the model's value.
OPTIONAL_MODEL_SUFFIXES = ("num_batches_tracked",)
# Activation convention of the layouts that have one, for checkpoints that carry no config: QuickGELU (CLIP paper)
# for OpenAI and Chinese-CLIP, GELU for TinyCLIP. open_clip / miniclip state dicts have none: GELU with a warning.
QUICK_GELU = {"openai": True, "cn_clip": True, "tinyclip": False}


def is_ignorable(key: str) -> bool:
    return (key in OPENAI_EXTRA_KEYS or key.endswith(("position_ids", "token_type_ids", "attn_mask"))
            or "bert.pooler." in key)


@dataclass
class Checkpoint:
    """A checkpoint read from disk, its tensors renamed to MiniClip's parameter names."""
    state: dict
    layout: str
    file: Path
    config: ClipConfig | None = None  # what the checkpoint says about its architecture, if anything
    ignored: list = field(default_factory=list)  # keys a converter deliberately dropped
    origin: dict = field(default_factory=dict)  # MiniClip name -> name in the file, for error messages

    @property
    def directory(self) -> Path:
        return self.file.parent


# --- key renaming for the open_clip family (open_clip, TinyCLIP, OpenAI) --------------------------------------------
_OPEN_CLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                   "attn_mask")


def open_clip_to_miniclip(state: dict) -> tuple[dict, list, dict]:
    """open_clip `CLIP` names -> MiniClip names; unknown keys pass through unchanged (the validator reports them)."""
    out, ignored, origin = {}, [], {}
    for key, value in state.items():
        name = key[len("text."):] if key.startswith("text.") else key  # open_clip's CustomTextCLIP nests under text.
        if key in OPENAI_EXTRA_KEYS:
            ignored.append(key)
            continue
        if name.startswith("visual."):
            new = "image_encoder." + name
        elif name in ("logit_scale", "logit_bias"):
            new = f"{name}.{name}"
        elif name.startswith(_OPEN_CLIP_TEXT):
            new = "text_encoder." + name
        else:
            new = key
        out[new], origin[new] = value, key
    return out, ignored, origin


def miniclip_to_open_clip(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("image_encoder."):
            out[key[len("image_encoder."):]] = value
        elif key.startswith("text_encoder."):
            out[key[len("text_encoder."):]] = value
        else:  # logit_scale.logit_scale, logit_bias.logit_bias
            out[key.split(".")[0]] = value
    return out


# --- detection ------------------------------------------------------------------------------------------------------
def _is_tinyclip_auto(keys) -> bool:
    # TinyCLIP's pruning wrapper names its towers _image_encoder / _text_encoder and stores l0-module gate
    # parameters (*_loga, lambda_*) next to the weights.
    return any(k.startswith(("_image_encoder.", "_text_encoder.", "_logit_scale.")) or "l0_module" in k
               or k.endswith("_loga") for k in keys)


def detect_layout(state: dict, file: Path, kind: str) -> str:
    """Which project saved this state dict, from its keys (and the file kind / name)."""
    keys = list(state)
    if _is_tinyclip_auto(keys):
        return "tinyclip_auto"
    if any(k.startswith(("image_encoder.", "text_encoder.")) for k in keys):
        return "miniclip"
    if any(k.startswith("vision_model.") for k in keys):
        return "hf_chinese_clip" if any(k.startswith("text_model.encoder.layer.") for k in keys) else "hf_clip"
    if any(k.startswith("bert.") for k in keys):
        return "cn_clip"
    if any(k.startswith("visual.") for k in keys):
        if kind == "torchscript" or any(k in state for k in OPENAI_EXTRA_KEYS):
            return "openai"
        return "tinyclip" if "tinyclip" in file.name.lower() else "open_clip"
    raise CheckpointError(f"{file}: unrecognised checkpoint layout (first keys: {keys[:6]}). Known layouts: "
                          f"{list(Format.__args__[1:])}. Fix: pass format=... if it is one of them.")


def _refuse_tinyclip_auto(file: Path):
    raise CheckpointError(
        f"{file} is a TinyCLIP auto-inheritance (pruned) checkpoint: its layers have individually pruned heads and "
        "MLP widths (l0-module masks / _image_encoder.* keys), which MiniClip's uniform towers cannot hold. It is "
        "not supported; use a manual-inheritance TinyCLIP checkpoint (e.g. TinyCLIP-ViT-40M-32-Text-19M-LAION400M), "
        "or its Hugging Face export (wkcn/TinyCLIP-auto-...) if one exists, as a CLIPModel folder.")


def _converter(module: str):
    try:
        return __import__(f"miniclip.{module}", fromlist=["*"])
    except ImportError as e:
        raise CheckpointError(f"this layout needs miniclip/{module}.py, which could not be imported: {e}") from None


# --- reading each layout ----------------------------------------------------------------------------------------------
def _read_state(file: Path, allow_unsafe_pickle: bool) -> tuple[dict, str]:
    obj, kind = read_checkpoint(file, allow_unsafe_pickle)
    return unwrap_state_dict(obj, file), kind


def read_file_checkpoint(file: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
                         config: ClipConfig | None = None, hf_config: dict | None = None) -> Checkpoint:
    """A single weights file; its layout from `format` or its keys."""
    state, kind = _read_state(file, allow_unsafe_pickle)
    layout = detect_layout(state, file, kind) if format == "auto" else format
    if layout == "tinyclip_auto" or _is_tinyclip_auto(state):
        _refuse_tinyclip_auto(file)
    if layout in ("open_clip", "tinyclip", "openai"):
        renamed, ignored, origin = open_clip_to_miniclip(state)
        return Checkpoint(renamed, layout, file, ignored=ignored, origin=origin)
    if layout == "miniclip":
        return Checkpoint(state, layout, file)
    if layout == "cn_clip":
        renamed, ignored = _converter("convert_chinese").cn_clip_to_miniclip(state)
        return Checkpoint(renamed, layout, file, ignored=list(ignored))
    if layout in ("hf_clip", "hf_chinese_clip"):
        return _convert_hf(state, layout, file, config, hf_config)
    raise CheckpointError(f"format={format!r} is not one of {list(Format.__args__)}")


def _convert_hf(state: dict, layout: str, file: Path, config: ClipConfig | None, hf_config: dict | None):
    chinese = layout == "hf_chinese_clip"
    module = _converter("convert_chinese" if chinese else "convert_hf")
    if hf_config is None:
        if config is None:
            kind = "ChineseCLIPModel" if chinese else "CLIPModel"
            raise CheckpointError(f"{file} looks like a Hugging Face {kind} state dict without its config.json. "
                                  "Fix: load the folder holding config.json, or pass config=<model config>.")
        hf_config = (module.miniclip_config_to_hf_chinese_clip(config) if chinese
                     else module.miniclip_config_to_hf_clip(config))
    to_miniclip = module.hf_chinese_clip_to_miniclip if chinese else module.hf_clip_to_miniclip
    renamed, ignored = to_miniclip(state, hf_config)
    hf_to_config = module.hf_chinese_clip_config_to_miniclip if chinese else module.hf_clip_config_to_miniclip
    return Checkpoint(renamed, layout, file, config=hf_to_config(hf_config), ignored=list(ignored))


def _weights_in(directory: Path, preferred: tuple[str, ...]) -> Path | None:
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    return None


def read_folder_checkpoint(directory: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
                           config: ClipConfig | None = None) -> Checkpoint:
    """A checkpoint folder: miniclip (model_config.json), open_clip hub (open_clip_config.json), Hugging Face
    (config.json), or any folder with exactly one weights file."""
    if format in ("auto", "miniclip") and (directory / CONFIG_FILE).is_file():
        file = _require(directory, (MODEL_FILE,), "miniclip")
        ckpt = read_file_checkpoint(file, "miniclip", allow_unsafe_pickle)
        ckpt.config = _load_json_config(directory / CONFIG_FILE)
        return ckpt
    if format in ("auto", "open_clip", "tinyclip", "openai") and (directory / OPEN_CLIP_CONFIG).is_file():
        file = _require(directory, OPEN_CLIP_WEIGHTS, "open_clip hub")
        ckpt = read_file_checkpoint(file, "open_clip" if format == "auto" else format, allow_unsafe_pickle)
        data = _read_json(directory / OPEN_CLIP_CONFIG)
        ckpt.config = config_from_open_clip(data.get("model_cfg", data), data.get("preprocess_cfg"),
                                            where=str(directory / OPEN_CLIP_CONFIG), name=directory.name)
        return ckpt
    if format in ("auto", "hf_clip", "hf_chinese_clip") and (directory / "config.json").is_file():
        hf_config = _read_json(directory / "config.json")
        model_type = hf_config.get("model_type")
        layout = {"clip": "hf_clip", "chinese_clip": "hf_chinese_clip"}.get(model_type)
        if layout is None or format not in ("auto", layout):
            raise CheckpointError(f"{directory / 'config.json'} has model_type={model_type!r}; MiniClip loads "
                                  "'clip' (CLIPModel) and 'chinese_clip' (ChineseCLIPModel) folders")
        file = _require(directory, HF_WEIGHTS, "Hugging Face")
        state, _ = _read_state(file, allow_unsafe_pickle)
        return _convert_hf(state, layout, file, config, hf_config)
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                        and p.name != "training_args.bin")
    if len(candidates) != 1:
        raise CheckpointError(f"{directory} holds {len(candidates)} weights files ({[p.name for p in candidates]}) "
                              f"and no {CONFIG_FILE} / {OPEN_CLIP_CONFIG} / config.json saying which layout it is. "
                              "Fix: pass the path of the checkpoint file itself.")
    return read_file_checkpoint(candidates[0], format, allow_unsafe_pickle, config=config)


def _require(directory: Path, names: tuple[str, ...], what: str) -> Path:
    file = _weights_in(directory, names)
    if file is None:
        raise FileNotFoundError(f"{directory} looks like a {what} folder but has none of its weights files {list(names)}")
    return file


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _load_json_config(path: Path) -> ClipConfig:
    try:
        return ClipConfig.from_dict(_read_json(path), where=str(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def read_checkpoint_any(path: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
                        config: ClipConfig | None = None) -> Checkpoint:
    if path.is_dir():
        return read_folder_checkpoint(path, format, allow_unsafe_pickle, config)
    return read_file_checkpoint(path, format, allow_unsafe_pickle, config=config)
