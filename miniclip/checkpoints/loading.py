"""Loading published CLIP checkpoints into `MiniClip` with every tensor accounted for.

`load_pretrained` is a pipeline, each step once and in order: resolve the name (hub.py) -> read the file and detect
its layout and map its keys (layouts.py) -> choose the config (given, stored, or from shapes: architecture.py) ->
resize position embeddings (resize.py) -> check against a meta-device skeleton -> copy. Nothing is copied until every
tensor is matched: never a partial load. Leaves out on purpose: loading a subset of towers (`strict=False`), device
placement and precision (`model.to(...)` after loading).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights

from miniclip.checkpoints.architecture import architecture, infer_config
from miniclip.checkpoints.hub import resolve
from miniclip.checkpoints.io import CheckpointError
from miniclip.checkpoints.layouts import (LAYOUTS, OPTIONAL_MODEL_SUFFIXES, Checkpoint, Format, foreign_hints,
                                          is_ignorable, read_any)
from miniclip.checkpoints.resize import adapt_positions
from miniclip.config import ClipConfig, check_literal, list_model_configs, load_model_config
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)
SHOW = 5  # keys listed per group in a mismatch error


@dataclass(frozen=True)
class LoadResult:
    """What `load_pretrained` read: set as `model.load_info` (MiniClip declares the attribute)."""
    file: Path  # the weights file
    layout: str  # a key of layouts.LAYOUTS
    config_source: str  # "given (...)", "stored in the checkpoint (...)" or "inferred ..."
    ignored: list[str] = field(default_factory=list)  # checkpoint entries deliberately left unused
    resized: list[str] = field(default_factory=list)  # position embeddings that were interpolated / cut

    @property
    def directory(self) -> Path:
        """The folder the checkpoint came from (its tokenizer files, e.g. Chinese-CLIP's vocab.txt, live there)."""
        return self.file.parent


def load_pretrained(name_or_path: str | Path, config: ClipConfig | str | dict | None = None, format: str = "auto",
                    image_size: int | None = None, context_length: int | None = None,
                    allow_unsafe_pickle: bool = False) -> MiniClip:
    """A `MiniClip` (eval mode) holding the weights of a checkpoint file, folder or known name (see hub.py).

    config=None takes the architecture from the checkpoint (its stored config, else its shapes); image_size /
    context_length resize the position embeddings. Raises CheckpointError (a ValueError) on any mismatch.
    """
    check_literal(format, Format, "format")
    path = resolve(name_or_path)
    given = load_model_config(config) if config is not None else None
    ckpt = read_any(path, format, allow_unsafe_pickle, config=given)
    try:
        chosen, source = choose_config(ckpt, given)
    except CheckpointError as e:  # shapes could not be read: say which file, which layout, and what it looks like
        raise CheckpointError(f"{ckpt.file} (detected layout: {ckpt.layout}): {e}"
                              + "".join(f"\nLikely cause: {h}" for h in foreign_hints(ckpt.state))) from None
    chosen = _with_sizes(chosen, image_size, context_length)
    if given is None:  # a given config is the caller's word (a tokenizer of their own may go with it)
        check_vocabulary(chosen, ckpt)
    resized = adapt_positions(ckpt.state, chosen)
    with torch.device("meta"):  # shapes only: validation allocates nothing and fails fast
        skeleton = MiniClip(chosen)
    check_fits(skeleton, ckpt, source)
    expected = skeleton.state_dict()
    ignored = sorted(set(ckpt.ignored) | {ckpt.origin.get(k, k) for k in ckpt.state if k not in expected})
    model = _empty_model(chosen)
    _copy_into(model, ckpt.state)
    model.load_info = LoadResult(ckpt.file, ckpt.layout, source, ignored, resized)
    logger.info("loaded %s (layout %s, config %s)", ckpt.file, ckpt.layout, source)
    return model.eval()


def load_model_and_tokenizer(name_or_path: str | Path, **kwargs):
    """(MiniClip, tokenizer): the tokenizer its text tower was trained with (vocab.txt from the checkpoint folder)."""
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
        return ckpt.config, f"{ckpt.note or 'stored in the checkpoint'} ({ckpt.layout})"
    convention = ckpt.quick_gelu if ckpt.quick_gelu is not None else LAYOUTS[ckpt.layout].quick_gelu
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
        logger.warning("%s: the checkpoint does not say which activation it was trained with%s; assuming GELU "
                       "(LAION open_clip / TinyCLIP). If it was trained with QuickGELU (OpenAI-initialised, "
                       "*-quickgelu models), pass config= with \"quick_gelu\": true.%s", ckpt.file,
                       f" ({ckpt.note})" if ckpt.note else "", hint)
    elif ckpt.note:
        source += f"; {'QuickGELU' if convention else 'GELU'}: {ckpt.note}"
        logger.info("%s: %s activation: %s", ckpt.file, "QuickGELU" if convention else "GELU", ckpt.note)
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
def check_vocabulary(config: ClipConfig, ckpt: Checkpoint) -> None:
    """The token embedding needs a row for every id the tower's tokenizer emits; fewer rows would load and then
    fail in encode_text with a bare IndexError. (More rows are fine: unused ids.) A transformers text tower
    carries its own vocabulary in its config, so there is nothing to compare."""
    if config.text_cfg.tower == "hf":
        return
    try:
        tokenizer = get_tokenizer(config, checkpoint_dir=ckpt.directory)
    except FileNotFoundError:
        return  # no vocabulary to compare with; load_model_and_tokenizer says so when it is needed
    rows, needed = config.text_cfg.vocab_size, tokenizer.vocab_size
    if rows < needed:
        key = ("text_encoder.bert.embeddings.word_embeddings.weight" if config.text_cfg.tower == "bert"
               else "text_encoder.token_embedding.weight")
        raise CheckpointError(
            f"{ckpt.file}: {ckpt.origin.get(key, key)} has {rows} rows but the tower's tokenizer "
            f"({type(tokenizer).__name__}) emits ids up to {needed - 1} ({needed} tokens); nothing was loaded. "
            "Fix: the embedding was cut or trained with another tokenizer: use the original file, or a config and "
            "tokenizer with that vocabulary.")



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


def _likely_causes(config: ClipConfig, ckpt: Checkpoint, unexpected: list[str], wrong_type: list[str]) -> list[str]:
    causes = foreign_hints(unexpected)
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
