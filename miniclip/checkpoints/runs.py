"""What a training run records beside its weights, and what it means for the architecture: open_clip_train's run
folder (`logs/<run>/params.txt` naming the model, or the run `name` inside the checkpoint), TinyCLIP's training
checkpoints (their `args` Namespace), and the tutorial's Trainer output (its model.py always builds QuickGELU towers).

Leaves out on purpose: resuming those runs (optimizer, scaler and EMA entries are dropped) and guessing an activation
from a model name that neither miniclip's nor open_clip's configs know (that stays a warning asking for config=).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from miniclip.checkpoints.architecture import config_from_open_clip, infer_config
from miniclip.checkpoints.io import CheckpointError
from miniclip.config import ClipConfig, load_model_config

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.txt"  # open_clip_train writes one `name: value` line per argument into logs/<run>/
# open_clip_train's default run name: <date>-model_<model name, '/' as '-'>-lr_<lr>-b_<batch>-...
_RUN_NAME_MODEL = re.compile(r"-model_(.+?)-lr_")
# TinyCLIP's CLIPBase holds its towers as _image_encoder / _text_encoder / _logit_scale, each possibly wrapped in its
# own DistributedDataParallel (CLIPBase.ddpify), which adds `module.` after the tower name.
TINYCLIP_TOWERS = {"_image_encoder": "image_encoder", "_text_encoder": "text_encoder", "_logit_scale": "logit_scale"}
TUTORIAL_NOTE = ("the tutorial's Trainer output (image_encoder.* / text_encoder.* keys, no model_config.json): its "
                 "model.py builds every tower with quick_gelu=True")


# --- open_clip_train ------------------------------------------------------------------------------------------------
def run_params_file(file: Path) -> Path | None:
    """`logs/<run>/params.txt` for a checkpoint at `logs/<run>/checkpoints/epoch_N.pt`, if there is one."""
    candidate = file.parent.parent / PARAMS_FILE
    return candidate if file.parent.name == "checkpoints" and candidate.is_file() else None


def read_params(path: Path) -> dict[str, str]:
    """params.txt -> {argument: value as Python printed it}."""
    params = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            params[key.strip()] = value.strip()
    return params


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of an open_clip_train run folder: epoch_latest.pt, else the highest epoch_N.pt."""
    folder = run_dir / "checkpoints"
    if not (run_dir / PARAMS_FILE).is_file() or not folder.is_dir():
        return None
    if (folder / "epoch_latest.pt").is_file():
        return folder / "epoch_latest.pt"
    epochs = [(int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    if not epochs:
        raise CheckpointError(f"{run_dir} is an open_clip_train run folder whose checkpoints/ holds no epoch_N.pt. "
                              "Fix: pass the checkpoint file itself.")
    return max(epochs)[1]


def describe_open_clip_train(ckpt) -> None:
    """The model an open_clip_train run trained, from its params.txt, else from the run name in the checkpoint."""
    params_file = run_params_file(ckpt.file)
    if params_file is not None:
        params = read_params(params_file)
        if "model" in params:
            use_model_name(ckpt, params["model"], str(params_file),
                           force_quick_gelu=params.get("force_quick_gelu") == "True")
        return
    match = _RUN_NAME_MODEL.search(str(ckpt.run.get("name", "")))
    if match:
        use_model_name(ckpt, match.group(1), f"the run name {ckpt.run['name']!r} in {ckpt.file}")


# --- TinyCLIP training checkpoints ----------------------------------------------------------------------------------
def tinyclip_train_to_miniclip(state: dict) -> tuple[dict, dict]:
    """`_image_encoder.[module.]visual.*`, `_text_encoder.[module.]*`, `_logit_scale.[module.]logit_scale` ->
    MiniClip names (its towers keep open_clip's names below the tower). Returns (renamed, origin)."""
    out, origin = {}, {}
    for key, value in state.items():
        tower, _, rest = key.partition(".")
        if tower in TINYCLIP_TOWERS:
            rest = rest[len("module."):] if rest.startswith("module.") else rest
            new = f"{TINYCLIP_TOWERS[tower]}.{rest}"
        else:
            new = key
        out[new], origin[new] = value, key
    return out, origin


def describe_tinyclip_train(ckpt) -> None:
    """The model a TinyCLIP run trained, from its pickled `args.model` (e.g. TinyCLIP-ViT-39M-16-Text-19M)."""
    name = (ckpt.run.get("args") or {}).get("model")
    if name:
        use_model_name(ckpt, str(name), f"args.model={name!r} in {ckpt.file}")


# --- the tutorial ---------------------------------------------------------------------------------------------------
def describe_tutorial(ckpt) -> None:
    ckpt.quick_gelu, ckpt.note = True, TUTORIAL_NOTE


# --- model names -> config ------------------------------------------------------------------------------------------
def named_model_config(name: str) -> ClipConfig | None:
    """The config a model name stands for: miniclip's shipped configs, then open_clip's registry; None if unknown."""
    try:
        return load_model_config(name)
    except ValueError:
        pass
    import open_clip
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        return None
    return config_from_open_clip(model_cfg, where=f"open_clip model config {name!r}", name=name)


def use_model_name(ckpt, name: str, where: str, force_quick_gelu: bool = False) -> None:
    """Set ckpt.config from a model name the run recorded, with the image size and context length of the weights
    (open_clip_train's --force-image-size / --force-context-length change them); if the name is unknown, only
    what the run says about the activation (--force-quick-gelu)."""
    try:
        config = named_model_config(name)
    except CheckpointError as e:  # a known open_clip model MiniClip cannot build: the validator will say what differs
        logger.warning("%s: %s", where, e)
        config = None
    if config is None:
        if force_quick_gelu:
            ckpt.quick_gelu, ckpt.note = True, f"force_quick_gelu in {where}"
        else:
            ckpt.note = (f"{where} names model {name!r}, which neither miniclip's nor open_clip's model configs "
                         "know (a custom config?)")
        return
    data = config.to_dict()
    try:
        shapes = infer_config(ckpt.state, quick_gelu=config.quick_gelu)
        data["vision_cfg"]["image_size"] = shapes.vision_cfg.image_size
        data["text_cfg"]["context_length"] = shapes.text_cfg.context_length
    except (CheckpointError, KeyError, IndexError):
        pass  # the validator reports the shapes that do not fit
    if force_quick_gelu:
        data["quick_gelu"] = True
    ckpt.config = ClipConfig.from_dict(data, where=f"model config {name!r}")
    ckpt.note = f"model {name!r} from {where}" + (", force_quick_gelu" if force_quick_gelu else "")
