"""Checkpoint layouts as one table: `LAYOUTS` holds one `Layout` record per project that saves CLIP weights (how its
files are recognised, how its keys become MiniClip's, what it says about the architecture, its activation default
and the hint shown when its keys turn up where they should not). Adding a layout = one record and its converter.

Leaves out on purpose: TinyCLIP's pruned "auto-inheritance" checkpoints (per-layer shapes MiniClip cannot build),
sharded weight files, and validation (loading.py does that, for every layout the same way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, get_args

from miniclip.checkpoints import chinese_clip, dual_encoder, hf_clip, runs
from miniclip.checkpoints.architecture import checkpoint_config, config_from_open_clip
from miniclip.checkpoints.io import (OPENAI_EXTRA_KEYS, CheckpointError, read_checkpoint, run_entries,
                                     safetensors_metadata, unwrap_state_dict)
from miniclip.config import ClipConfig
from miniclip.files import read_mapping_file

Format = Literal["auto", "miniclip", "tinyclip", "open_clip", "openai", "hf_clip", "cn_clip", "hf_chinese_clip",
                 "hf_dual_encoder", "tutorial", "open_clip_train", "tinyclip_train"]
ExportFormat = Literal["miniclip", "hf", "open_clip", "onnx"]

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "model_config.json", "tokenizer_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG, HF_WEIGHTS = "config.json", ("model.safetensors", "pytorch_model.bin")
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
MINICLIP_PREFIXES = ("image_encoder.", "text_encoder.", "logit_scale.", "logit_bias.")


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
    run: dict = field(default_factory=dict)  # what a training checkpoint says about its run (io.run_entries)
    quick_gelu: bool | None = None  # the activation the run recorded, when it says nothing more about the config
    note: str = ""  # where `config` / `quick_gelu` came from, for the log and LoadResult.config_source

    @property
    def directory(self) -> Path:
        return self.file.parent


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout. `matches(keys, file, kind)` recognises a state dict read by io.read_checkpoint
    (kind: 'safetensors', 'pickle', 'torchscript'); `convert(state, file, config, hf_config)` renames it into a
    Checkpoint; `read_folder(directory, layout, allow_unsafe_pickle)` reads one of its folders, or returns None
    when the folder is not of this layout."""
    name: str
    matches: Callable[[list, Path, str], bool]
    convert: Callable[..., Checkpoint]
    quick_gelu: bool | None = None  # activation when the file carries no config; None: not known (GELU, warned)
    key_prefixes: tuple[str, ...] = ()  # keys that give this layout away in another layout's file
    hint: str | None = None  # the likely cause shown when such keys appear unexpectedly
    read_folder: Callable[..., Checkpoint | None] | None = None
    # fills Checkpoint.config / quick_gelu / note from what the run recorded (runs.py); run when no config is stored
    describe_run: Callable[[Checkpoint], None] | None = None


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
        elif name.startswith(_OPEN_CLIP_TEXT) or key.startswith("text."):  # text.*: a CustomTextCLIP's text tower
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


def _has(keys, prefixes) -> bool:
    return any(k.startswith(prefixes) for k in keys)


# --- converters: (state, file, config, hf_config) -> Checkpoint --------------------------------------------------------
def _as_is(layout: str):
    return lambda state, file, config=None, hf_config=None: Checkpoint(state, layout, file)


def _open_clip_family(layout: str):
    def convert(state, file, config=None, hf_config=None):
        renamed, ignored, origin = open_clip_to_miniclip(state)
        return Checkpoint(renamed, layout, file, ignored=ignored, origin=origin)
    return convert


def _tinyclip_train(state, file, config=None, hf_config=None):
    renamed, origin = runs.tinyclip_train_to_miniclip(state)
    return Checkpoint(renamed, "tinyclip_train", file, origin=origin)


def _cn_clip(state, file, config=None, hf_config=None):
    renamed, ignored = chinese_clip.cn_clip_to_miniclip(state)
    return Checkpoint(renamed, "cn_clip", file, ignored=list(ignored))


def _hf(layout: str, module, to_hf_config, to_miniclip, to_config, model_class: str):
    def convert(state, file, config=None, hf_config=None):
        if hf_config is None:
            if config is None:
                raise CheckpointError(f"{file} looks like a Hugging Face {model_class} state dict without its "
                                      f"{HF_CONFIG}. Fix: load the folder holding {HF_CONFIG}, or pass config=<model config>.")
            hf_config = to_hf_config(config)
        renamed, ignored = to_miniclip(state, hf_config)
        return Checkpoint(renamed, layout, file, config=to_config(hf_config), ignored=list(ignored))
    return convert


def _dual_encoder(state, file, config=None, hf_config=None):
    renamed, origin, stored = dual_encoder.convert(state, file, config, hf_config)
    return Checkpoint(renamed, "hf_dual_encoder", file, config=stored, origin=origin)


# --- folders ----------------------------------------------------------------------------------------------------------
def _weights(directory: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} looks like a {what} folder but has none of its weights files {list(names)}")


def _read_json(path: Path) -> dict:
    try:
        return read_mapping_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _miniclip_folder(directory: Path, layout: str, allow_unsafe_pickle: bool) -> Checkpoint | None:
    if not (directory / CONFIG_FILE).is_file():
        return None
    ckpt = read_file(_weights(directory, (MODEL_FILE,), "miniclip"), "miniclip", allow_unsafe_pickle)
    ckpt.config = checkpoint_config(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    return ckpt


def _open_clip_folder(directory: Path, layout: str, allow_unsafe_pickle: bool) -> Checkpoint | None:
    if not (directory / OPEN_CLIP_CONFIG).is_file():
        return None
    ckpt = read_file(_weights(directory, OPEN_CLIP_WEIGHTS, "open_clip hub"), layout, allow_unsafe_pickle)
    data = _read_json(directory / OPEN_CLIP_CONFIG)
    ckpt.config = config_from_open_clip(data.get("model_cfg", data), data.get("preprocess_cfg"),
                                        where=str(directory / OPEN_CLIP_CONFIG), name=directory.name)
    return ckpt


def _open_clip_train_folder(directory: Path, layout: str, allow_unsafe_pickle: bool) -> Checkpoint | None:
    file = runs.latest_run_checkpoint(directory)
    return None if file is None else read_file(file, layout, allow_unsafe_pickle)


def _is_tutorial_file(keys, file: Path, kind: str) -> bool:
    """MiniClip's key names without miniclip's config file or its safetensors tag: the tutorial's MiniTrainer
    (Hugging Face Trainer.save_model of its nn.Module) wrote it."""
    return (_has(keys, ("image_encoder.", "text_encoder.")) and not (file.parent / CONFIG_FILE).is_file()
            and (kind != "safetensors" or safetensors_metadata(file).get("layout") != "miniclip"))


def _hf_folder(model_type: str):
    def read_folder(directory: Path, layout: str, allow_unsafe_pickle: bool) -> Checkpoint | None:
        if not (directory / HF_CONFIG).is_file():
            return None
        hf_config = _read_json(directory / HF_CONFIG)
        if hf_config.get("model_type") != model_type:
            return None
        file = _weights(directory, HF_WEIGHTS, "Hugging Face")
        return LAYOUTS[layout].convert(read_state(file, allow_unsafe_pickle)[0], file, None, hf_config)
    return read_folder


# --- the table, in detection order ------------------------------------------------------------------------------------
_OPEN_CLIP_HINT = ("this looks like an open_clip / OpenAI / TinyCLIP state dict (visual.*, transformer.* keys): "
                   "pass format='open_clip' (or 'openai', 'tinyclip')")
_HF_HINT = ("this looks like a Hugging Face CLIPModel / ChineseCLIPModel state dict: load its folder (with "
            "config.json), or pass format='hf_clip' / 'hf_chinese_clip'")
_OPEN_CLIP_KEYS = ("visual.", "token_embedding.", "transformer.resblocks.")
_HF_KEYS = ("vision_model.", "text_model.", "visual_projection.")

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in [
    Layout("tutorial", matches=_is_tutorial_file, convert=_as_is("tutorial"), quick_gelu=True,
           describe_run=runs.describe_tutorial),
    Layout("miniclip", matches=lambda keys, file, kind: _has(keys, ("image_encoder.", "text_encoder.")),
           convert=_as_is("miniclip"), read_folder=_miniclip_folder),
    Layout("tinyclip_train", matches=lambda keys, file, kind: _has(keys, tuple(f"{t}." for t in runs.TINYCLIP_TOWERS)),
           convert=_tinyclip_train, quick_gelu=False, key_prefixes=tuple(f"{t}." for t in runs.TINYCLIP_TOWERS),
           hint="this looks like a TinyCLIP training checkpoint (_image_encoder.* keys): pass "
           "format='tinyclip_train'", describe_run=runs.describe_tinyclip_train),
    Layout("hf_dual_encoder", matches=dual_encoder.matches, convert=_dual_encoder,
           key_prefixes=("vision_model.timm_model.",), hint="this looks like a transformers "
           "VisionTextDualEncoderModel state dict (run_clip.py): load its folder, or pass format='hf_dual_encoder'",
           read_folder=_hf_folder(dual_encoder.MODEL_TYPE)),
    Layout("hf_chinese_clip", matches=lambda keys, file, kind: _has(keys, ("text_model.encoder.layer.",))
           and _has(keys, ("vision_model.",)),
           convert=_hf("hf_chinese_clip", chinese_clip, chinese_clip.miniclip_config_to_hf_chinese_clip,
                       chinese_clip.hf_chinese_clip_to_miniclip, chinese_clip.hf_chinese_clip_config_to_miniclip,
                       "ChineseCLIPModel"),
           key_prefixes=_HF_KEYS, hint=_HF_HINT, read_folder=_hf_folder("chinese_clip")),
    Layout("hf_clip", matches=lambda keys, file, kind: _has(keys, ("vision_model.",)),
           convert=_hf("hf_clip", hf_clip, hf_clip.miniclip_config_to_hf_clip, hf_clip.hf_clip_to_miniclip,
                       hf_clip.hf_clip_config_to_miniclip, "CLIPModel"),
           key_prefixes=_HF_KEYS, hint=_HF_HINT, read_folder=_hf_folder("clip")),
    Layout("cn_clip", matches=lambda keys, file, kind: _has(keys, ("bert.",)), convert=_cn_clip, quick_gelu=True,
           key_prefixes=("bert.",), hint="this looks like a Chinese-CLIP checkpoint (bert.* keys): pass "
           "format='cn_clip' and a BERT config (e.g. ChineseCLIP-ViT-B-16), or config=None"),
    Layout("openai", matches=lambda keys, file, kind: _has(keys, ("visual.",))
           and (kind == "torchscript" or any(k in OPENAI_EXTRA_KEYS for k in keys)),
           convert=_open_clip_family("openai"), quick_gelu=True, key_prefixes=_OPEN_CLIP_KEYS, hint=_OPEN_CLIP_HINT,
           read_folder=_open_clip_folder),
    Layout("tinyclip", matches=lambda keys, file, kind: _has(keys, ("visual.",)) and "tinyclip" in file.name.lower(),
           convert=_open_clip_family("tinyclip"), quick_gelu=False, key_prefixes=_OPEN_CLIP_KEYS,
           hint=_OPEN_CLIP_HINT, read_folder=_open_clip_folder),
    Layout("open_clip_train", matches=lambda keys, file, kind: _has(keys, ("visual.",))
           and runs.run_params_file(file) is not None, convert=_open_clip_family("open_clip_train"),
           key_prefixes=_OPEN_CLIP_KEYS, hint=_OPEN_CLIP_HINT, read_folder=_open_clip_train_folder,
           describe_run=runs.describe_open_clip_train),
    Layout("open_clip", matches=lambda keys, file, kind: _has(keys, ("visual.",)),
           convert=_open_clip_family("open_clip"), key_prefixes=_OPEN_CLIP_KEYS, hint=_OPEN_CLIP_HINT,
           read_folder=_open_clip_folder, describe_run=runs.describe_open_clip_train),
]}
assert set(LAYOUTS) == set(get_args(Format)[1:]), "every Format has one Layout record"
# The folder kinds in the order they are recognised (an open_clip hub folder may hold any open_clip-family file).
FOLDER_ORDER = ("miniclip", "open_clip", "openai", "tinyclip", "hf_clip", "hf_chinese_clip", "hf_dual_encoder",
                "open_clip_train")


# --- reading ----------------------------------------------------------------------------------------------------------
def _is_tinyclip_auto(keys) -> bool:
    # TinyCLIP's pruning runs store their L0-module gates (l0_module.*: *_loga, lambda_1 / lambda_2) next to the
    # weights; its plain training checkpoints (tinyclip_train) have the same _image_encoder.* names without them.
    return any("l0_module." in k or k.endswith("_loga") for k in keys)


def _refuse_tinyclip_auto(file: Path):
    raise CheckpointError(
        f"{file} is a TinyCLIP auto-inheritance (pruned) checkpoint: its layers have individually pruned heads and "
        "MLP widths (l0_module.* / *_loga mask keys), which MiniClip's uniform towers cannot hold. It is "
        "not supported; use a manual-inheritance TinyCLIP checkpoint (e.g. TinyCLIP-ViT-40M-32-Text-19M-LAION400M), "
        "or its Hugging Face export (wkcn/TinyCLIP-auto-...) if one exists, as a CLIPModel folder.")


def detect_layout(state: dict, file: Path, kind: str) -> str:
    """Which project saved this state dict: the first record of LAYOUTS whose `matches` accepts its keys."""
    keys = list(state)
    for layout in LAYOUTS.values():
        if layout.matches(keys, file, kind):
            return layout.name
    raise CheckpointError(f"{file}: unrecognised checkpoint layout (first keys: {keys[:6]}). Known layouts: "
                          f"{list(LAYOUTS)}. Fix: pass format=... if it is one of them.")


def read_state(file: Path, allow_unsafe_pickle: bool) -> tuple[dict, str]:
    obj, kind = read_checkpoint(file, allow_unsafe_pickle)
    return unwrap_state_dict(obj, file), kind


def read_file(file: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
              config: ClipConfig | None = None) -> Checkpoint:
    """A single weights file -> Checkpoint; its layout from `format` or its keys, its run's record read."""
    obj, kind = read_checkpoint(file, allow_unsafe_pickle)
    state = unwrap_state_dict(obj, file)
    if _is_tinyclip_auto(state):
        _refuse_tinyclip_auto(file)
    layout = detect_layout(state, file, kind) if format == "auto" else format
    ckpt = LAYOUTS[layout].convert(state, file, config, None)
    ckpt.run = run_entries(obj)
    if ckpt.config is None and LAYOUTS[layout].describe_run is not None:
        LAYOUTS[layout].describe_run(ckpt)
    return ckpt


def read_folder(directory: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
                config: ClipConfig | None = None) -> Checkpoint:
    """A checkpoint folder: the first layout (FOLDER_ORDER) that recognises it, else its one weights file."""
    for name in FOLDER_ORDER:
        if format not in ("auto", name):
            continue
        ckpt = LAYOUTS[name].read_folder(directory, "open_clip" if format == "auto" and name in
                                         ("openai", "tinyclip") else name, allow_unsafe_pickle)
        if ckpt is not None:
            return ckpt
    if (directory / HF_CONFIG).is_file():
        model_type = _read_json(directory / HF_CONFIG).get("model_type")
        raise CheckpointError(f"{directory / HF_CONFIG} has model_type={model_type!r}; MiniClip loads 'clip' "
                              "(CLIPModel), 'chinese_clip' (ChineseCLIPModel) and 'vision-text-dual-encoder' "
                              "(VisionTextDualEncoderModel) folders")
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                        and not _is_trainer_state(p.name))
    if len(candidates) != 1:
        raise CheckpointError(f"{directory} holds {len(candidates)} weights files ({[p.name for p in candidates]}) "
                              f"and no {CONFIG_FILE} / {OPEN_CLIP_CONFIG} / {HF_CONFIG} saying which layout it is. "
                              "Fix: pass the path of the checkpoint file itself.")
    return read_file(candidates[0], format, allow_unsafe_pickle, config=config)


def _is_trainer_state(name: str) -> bool:
    """Files a Hugging Face Trainer checkpoint-* folder holds beside the weights (the tutorial's folders too)."""
    return name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt") or (
        name.startswith("rng_state") and name.endswith(".pth"))


def read_any(path: Path, format: str = "auto", allow_unsafe_pickle: bool = False,
             config: ClipConfig | None = None) -> Checkpoint:
    """Read a file or folder in any layout of LAYOUTS, keys renamed to MiniClip's."""
    if path.is_dir():
        return read_folder(path, format, allow_unsafe_pickle, config)
    return read_file(path, format, allow_unsafe_pickle, config=config)


def foreign_hints(keys) -> list[str]:
    """The hints of the layouts whose keys appear among `keys` (keys that are not MiniClip's)."""
    foreign = [k for k in keys if not k.startswith(MINICLIP_PREFIXES)]
    hints = []
    for layout in LAYOUTS.values():
        if layout.hint and layout.hint not in hints and _has(foreign, layout.key_prefixes):
            hints.append(layout.hint)
    return hints
