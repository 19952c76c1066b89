"""Loading published CLIP checkpoints into `MiniClip` with every tensor accounted for, and saving models back out.

`load_pretrained` = resolve a name or path (hub.py) -> read and rename the layout (layouts.py) -> pick the config
(given, stored, or inferred from shapes: infer.py) -> resize position embeddings (resize.py) -> validate strictly
against a meta-device skeleton -> fill a model whose parameters start on meta. Nothing is copied until every tensor
is matched: never a partial load. Leaves out on purpose: loading a subset of towers (`strict=False`), device
placement and precision (`model.to(...)` after loading).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint_io import CheckpointError, atomic_write_text, save_safetensors
from .config import ClipConfig, _check_literal, list_model_configs, load_model_config
from .infer import architecture, infer_config
from .layouts import (CONFIG_FILE, IGNORABLE, MODEL_FILE, OPEN_CLIP_CONFIG, OPTIONAL_MODEL_SUFFIXES, QUICK_GELU,
                      TOKENIZER_FILE, Checkpoint, ExportFormat, Format, is_ignorable, miniclip_to_open_clip,
                      read_checkpoint_any)
from .resize import adapt_positions

__all__ = ["CheckpointError", "IGNORABLE", "load_pretrained", "load_model_and_tokenizer", "save_pretrained"]
logger = logging.getLogger(__name__)
SHOW = 5  # keys listed per group in a mismatch error


def load_pretrained(name_or_path: str | Path, config: ClipConfig | str | dict | None = None, format: str = "auto",
                    image_size: int | None = None, context_length: int | None = None,
                    allow_unsafe_pickle: bool = False):
    """A `MiniClip` (eval mode) holding the weights of a checkpoint file, folder or known name (see hub.py).

    config=None takes the architecture from the checkpoint (its stored config, else its shapes); image_size /
    context_length resize the position embeddings. Raises CheckpointError (a ValueError) on any mismatch.
    """
    from .hub import resolve
    from .model import MiniClip
    _check_literal(format, Format, "format")
    path = resolve(name_or_path)
    given = load_model_config(config) if config is not None else None
    ckpt = read_checkpoint_any(path, format, allow_unsafe_pickle, config=given)
    try:
        chosen, source = choose_config(ckpt, given)
    except CheckpointError as e:  # shapes could not be read: say which file, which layout, and what it looks like
        foreign = [k for k in ckpt.state if not k.startswith(("image_encoder.", "text_encoder.", "logit_"))]
        hints = [hint for prefixes, hint in _FOREIGN if any(k.startswith(prefixes) for k in foreign)]
        raise CheckpointError(f"{ckpt.file} (detected layout: {ckpt.layout}): {e}"
                              + "".join(f"\nLikely cause: {h}" for h in hints)) from None
    chosen = _with_sizes(chosen, image_size, context_length)
    resized = adapt_positions(ckpt.state, chosen)
    with torch.device("meta"):  # shapes only: validation allocates nothing and fails fast
        skeleton = MiniClip(chosen)
    check_fits(skeleton, ckpt, source)
    expected = skeleton.state_dict()
    ignored = sorted(set(ckpt.ignored) | {ckpt.origin.get(k, k) for k in ckpt.state if k not in expected})
    model = _empty_model(chosen)
    _copy_into(model, ckpt.state)
    model.checkpoint_dir = ckpt.directory
    model.load_info = {"file": str(ckpt.file), "layout": ckpt.layout, "config_source": source,
                       "ignored": ignored, "resized": resized}
    logger.info("loaded %s (layout %s, config %s)", ckpt.file, ckpt.layout, source)
    return model.eval()


def load_model_and_tokenizer(name_or_path: str | Path, **kwargs):
    """(MiniClip, tokenizer): the tokenizer its text tower was trained with (vocab.txt from the checkpoint folder)."""
    from .tokenizer import get_tokenizer
    model = load_pretrained(name_or_path, **kwargs)
    return model, get_tokenizer(model.config, checkpoint_dir=model.checkpoint_dir)


# --- config -----------------------------------------------------------------------------------------------------------
def _known_config_like(inferred: ClipConfig) -> ClipConfig | None:
    """A shipped model config with exactly the inferred shapes (ignoring sizes that resizing changes): it also
    knows what shapes cannot tell, the attention head width."""
    target = _shape_signature(inferred)
    for name in list_model_configs():
        try:
            known = load_model_config(name)
        except ValueError:
            continue
        if _shape_signature(known) == target:
            return known
    return None


def _shape_signature(config: ClipConfig) -> dict:
    arch = architecture(config)
    arch.pop("image size"), arch.pop("context length", None)
    return arch


def choose_config(ckpt: Checkpoint, given: ClipConfig | None) -> tuple[ClipConfig, str]:
    """The config to build: the caller's, else the checkpoint's own, else inferred from its shapes."""
    if given is not None:
        return given, f"given ({given.name or 'dict'})"
    if ckpt.config is not None:
        return ckpt.config, f"stored in the checkpoint ({ckpt.layout})"
    convention = QUICK_GELU.get(ckpt.layout)
    config = infer_config(ckpt.state, quick_gelu=bool(convention))
    source = "inferred from shapes"
    known = _known_config_like(config)
    if known is not None:  # same shapes as a shipped config: take what shapes cannot tell (head width) from it
        data = known.to_dict()
        data["vision_cfg"]["image_size"] = config.vision_cfg.image_size
        data["text_cfg"]["context_length"] = config.text_cfg.context_length
        data["quick_gelu"] = bool(convention)
        config = ClipConfig.from_dict(data, where=f"model config {known.name}")
        source = f"inferred (shapes of {known.name})"
    if convention is None:
        hint = (f" Its shapes are those of {known.name!r} (quick_gelu={known.quick_gelu}): pass config="
                f"{known.name!r} if it is that model." if known is not None else "")
        logger.warning("%s: the checkpoint does not say which activation it was trained with; assuming GELU "
                       "(LAION open_clip / TinyCLIP). If it was trained with QuickGELU (OpenAI-initialised, "
                       "*-quickgelu models), pass config= with \"quick_gelu\": true.%s", ckpt.file, hint)
    return config, source


def _with_sizes(config: ClipConfig, image_size: int | None, context_length: int | None) -> ClipConfig:
    if image_size is None and context_length is None:
        return config
    data = config.to_dict()
    if image_size is not None:
        data["vision_cfg"]["image_size"] = image_size
    if context_length is not None:
        data["text_cfg"]["context_length"] = context_length
    return ClipConfig.from_dict(data, where="config with image_size / context_length overrides")


# --- strict validation --------------------------------------------------------------------------------------------------
def _same_shape(value: torch.Tensor, target: torch.Tensor) -> bool:
    # a scalar stored as shape (1,) (older logit_scale) is the same value
    return value.shape == target.shape or (value.numel() == target.numel() == 1 and value.ndim <= 1)


def _castable(value: torch.Tensor, target: torch.Tensor) -> bool:
    if target.dtype.is_floating_point:
        return value.dtype.is_floating_point  # fp16 / bf16 / fp64 -> the model's dtype
    return not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool


def check_fits(model, ckpt: Checkpoint, config_source: str) -> None:
    """Raise one CheckpointError listing every missing / unexpected / wrong-shape / wrong-dtype key."""
    expected, state = model.state_dict(), ckpt.state
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_MODEL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected and not is_ignorable(k)]
    wrong_shape, wrong_type = [], []
    for key, target in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            wrong_type.append(f"{key}: a {type(value).__name__}, not a tensor")
        elif not _same_shape(value, target):
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
        elif not _castable(value, target):
            wrong_type.append(f"{key}: dtype {value.dtype}, the model needs {target.dtype}")
    if missing or unexpected or wrong_shape or wrong_type:
        raise CheckpointError(_mismatch_message(model.config, ckpt, config_source, missing, unexpected,
                                                wrong_shape, wrong_type))


def _group(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:SHOW]) + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")
    return f"\n  {title} ({len(items)}): {shown}"


def _mismatch_message(config, ckpt, source, missing, unexpected, wrong_shape, wrong_type) -> str:
    named = [ckpt.origin.get(k, k) for k in unexpected]
    text = (f"{ckpt.file} (detected layout: {ckpt.layout}) does not fit the model config "
            f"{config.name or ''} [{source}]; nothing was loaded.")
    for title, items in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", named),
                         ("wrong shape", wrong_shape), ("wrong type", wrong_type)):
        if items:
            text += _group(title, items)
    return text + "\nLikely cause: " + "; ".join(_likely_causes(config, ckpt, named, wrong_type))


_FOREIGN = [
    (("vision_model.", "text_model.", "visual_projection."), "this looks like a Hugging Face CLIPModel / "
     "ChineseCLIPModel state dict: load its folder (with config.json), or pass format='hf_clip' / 'hf_chinese_clip'"),
    (("bert.",), "this looks like a Chinese-CLIP checkpoint (bert.* keys): pass format='cn_clip' and a BERT config "
     "(e.g. ChineseCLIP-ViT-B-16), or config=None"),
    (("visual.", "token_embedding.", "transformer.resblocks."), "this looks like an open_clip / OpenAI / TinyCLIP "
     "state dict (visual.*, transformer.* keys): pass format='open_clip' (or 'openai', 'tinyclip')"),
]


def _likely_causes(config: ClipConfig, ckpt: Checkpoint, unexpected: list[str], wrong_type: list[str]) -> list[str]:
    causes = [hint for prefixes, hint in _FOREIGN if any(k.startswith(prefixes) for k in unexpected)]
    try:
        inferred = infer_config(ckpt.state, quick_gelu=config.quick_gelu)
    except (CheckpointError, ValueError, KeyError, IndexError, RuntimeError, AttributeError):
        inferred = None
    if inferred is not None:
        ours, theirs = architecture(config), architecture(inferred)
        diffs = []
        for key in ours:
            if key in ("image size", "context length") or ours[key] == theirs.get(key):
                continue
            if key.endswith("layers"):
                diffs.append(f"the checkpoint has {theirs[key]} {key} and the config {ours[key]}")
            else:
                diffs.append(f"{key} is {theirs.get(key)} in the checkpoint and {ours[key]} in the config")
        if diffs:
            known = _known_config_like(inferred)
            fix = (f"use config {known.name!r} or pass config=None to infer it" if known is not None
                   else "pass config=None to infer the architecture from the checkpoint")
            causes.append(", ".join(diffs) + ": " + fix)
    if wrong_type:
        causes.append("some entries are not floating-point weights (a corrupted or hand-edited file?)")
    if not causes:
        causes.append("keys were dropped, renamed or added after saving (a damaged or hand-edited file?) "
                      "or the layout was misdetected (pass format=...)")
    return causes


def _empty_model(config: ClipConfig):
    """MiniClip with its parameters on the meta device (no memory, no random init) and its buffers real: the
    non-persistent ones (causal mask, BERT position ids) are computed at construction and never stored."""
    from accelerate import init_empty_weights
    from .model import MiniClip
    with init_empty_weights(include_buffers=False):
        return MiniClip(config)


def _owned(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A copy of `value` in fresh memory, in the target's dtype and shape. Always a copy: safetensors and
    mmap-loaded .pt tensors are views of the file, and a parameter left there would change (or crash with SIGBUS)
    when someone rewrites that file in place, e.g. a Trainer saving into the folder it loaded from."""
    out = torch.empty(target.shape, dtype=target.dtype)
    with torch.no_grad():
        out.copy_(value.detach().reshape(target.shape))
    return out


def _copy_into(model, state: dict) -> None:
    """Give the (meta-parameter) model a fresh copy of each checkpoint tensor, dropping the source from `state` as
    it goes: in process memory the weights exist about once (the model growing as the checkpoint shrinks), plus the
    file's page cache for memory-mapped reads. Called only after check_fits accepted every key."""
    targets = model.state_dict(keep_vars=True)
    new_state = {}
    for key, target in targets.items():
        value = state.pop(key, None)
        new_state[key] = target if value is None else _owned(value, target)  # None: an optional buffer
    state.clear()
    model.load_state_dict(new_state, strict=True, assign=True)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen after check_fits; a guard against a future model change
        raise CheckpointError(f"internal error: {left[:5]} were not filled")


# --- saving -----------------------------------------------------------------------------------------------------------
def save_pretrained(model, output_dir: str | Path, format: str = "miniclip", tokenizer=None) -> Path:
    """Write `model` as a miniclip folder (model.safetensors + model_config.json + tokenizer_config.json
    [+ vocab.txt]), a Hugging Face CLIPModel / ChineseCLIPModel folder ("hf") or an open_clip hub folder
    ("open_clip"). Every file is written atomically."""
    _check_literal(format, ExportFormat, "format")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    config: ClipConfig = model.config
    if format == "miniclip":
        save_safetensors(state, output_dir / MODEL_FILE, metadata={"format": "pt", "layout": "miniclip"})
        atomic_write_text(output_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2, ensure_ascii=False) + "\n")
        _save_tokenizer(model, tokenizer, output_dir, describe=True)
    elif format == "hf":
        _save_hf(state, config, output_dir)
        _save_tokenizer(model, tokenizer, output_dir, describe=False)
    else:
        _save_open_clip(state, config, output_dir)
    return output_dir


def _save_tokenizer(model, tokenizer, output_dir: Path, describe: bool) -> None:
    from .tokenizer import VOCAB_FILENAME, BertWordPieceTokenizer, get_tokenizer
    if tokenizer is None:
        try:
            tokenizer = get_tokenizer(model.config, checkpoint_dir=getattr(model, "checkpoint_dir", None))
        except FileNotFoundError as e:
            logger.warning("no tokenizer saved with the model: %s", e)
            return
    if describe:
        atomic_write_text(output_dir / TOKENIZER_FILE, json.dumps(tokenizer.describe(), indent=2) + "\n")
    if isinstance(tokenizer, BertWordPieceTokenizer):
        source, target = Path(tokenizer.vocab_file), output_dir / VOCAB_FILENAME
        if not target.exists() or source.resolve() != target.resolve():
            atomic_write_text(target, source.read_text(encoding="utf-8"))


def _save_hf(state: dict, config: ClipConfig, output_dir: Path) -> None:
    from .layouts import _converter
    if config.text_cfg.tower == "bert":
        module = _converter("convert_chinese")
        hf_state, hf_config = module.miniclip_to_hf_chinese_clip(state, config), \
            module.miniclip_config_to_hf_chinese_clip(config)
    else:
        module = _converter("convert_hf")
        hf_state, hf_config = module.miniclip_to_hf_clip(state, config), module.miniclip_config_to_hf_clip(config)
    save_safetensors(hf_state, output_dir / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(output_dir / "config.json", json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")


def _save_open_clip(state: dict, config: ClipConfig, output_dir: Path) -> None:
    if config.text_cfg.tower != "transformer":
        raise ValueError("format='open_clip' needs open_clip's own text transformer; this model has a BERT text "
                         "tower (Chinese-CLIP). Use format='hf' (ChineseCLIPModel) or 'miniclip' instead.")
    model_cfg = config.open_clip_cfg()
    if config.vision_cfg.is_resnet:
        model_cfg["vision_cfg"].pop("patch_size")
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    p = config.preprocess_cfg
    preprocess = {"mean": list(p.mean), "std": list(p.std), "interpolation": "bicubic", "resize_mode": p.resize_mode}
    save_safetensors(miniclip_to_open_clip(state), output_dir / "open_clip_model.safetensors",
                     metadata={"format": "pt"})
    atomic_write_text(output_dir / OPEN_CLIP_CONFIG,
                      json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
