"""Any pretrained towers: a timm image model (open_clip's `TimmModel`) and a transformers text model (open_clip's
`HFTextEncoder`), built from a `ClipConfig`, and the self-contained config a checkpoint of them is saved with.

Leaves out on purpose: encoder-decoder text models (T5: open_clip takes their encoder, not done here), and
open_clip's custom attention-pool options beyond what `TimmModel` itself builds.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from open_clip.hf_model import HFTextEncoder, register_pooler
from open_clip.timm_model import TimmModel
from torch import nn

from miniclip.config import HF_FIX, ClipConfig, read_timm_folder_config
from miniclip.files import atomic_write_json, cache_dir

LOCAL_DIR = "local-dir:"


@register_pooler
class EotPooler(nn.Module):
    """The hidden state at each row's last real token: where a causal text model has read the whole caption.
    Registered with open_clip's pooler table as "eot_pooler"."""
    cls_token_position = None  # HFTextEncoder.forward reads it when it returns tokens

    def forward(self, x, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(dim=1) - 1  # (B,) index of the last attended position (right padding)
        return x.last_hidden_state[torch.arange(last.shape[0], device=last.device), last]  # (B, W)


# --- image: timm ------------------------------------------------------------------------------------------------------
def timm_source(config: ClipConfig) -> tuple[str, bool]:
    """(the model name TimmModel builds, whether timm loads pretrained weights). A local folder and explicit model
    arguments both go through timm's own `local-dir:` scheme: a folder holding a config.json."""
    v = config.vision_cfg
    if v.pretrained is not None:
        return LOCAL_DIR + str(Path(v.pretrained).resolve()), True
    if v.timm_model_args:
        return LOCAL_DIR + str(_args_folder(v.timm_model_name, v.timm_model_args)), False
    if v.timm_model_name.startswith(LOCAL_DIR):
        read_timm_folder_config(v.timm_model_name[len(LOCAL_DIR):], "vision_cfg.timm_model_name")  # clear error
    return v.timm_model_name, v.timm_model_pretrained


def _args_folder(name: str, model_args: dict) -> Path:
    """A cached folder whose config.json says `name` + `model_args` (TimmModel forwards no model arguments; timm
    reads them from such a file). Content-addressed, so every build of one architecture shares one file."""
    import timm
    pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    content = {"architecture": name.split(".")[0], "model_args": model_args,
               "pretrained_cfg": {k: v for k, v in (pretrained_cfg.to_dict() if pretrained_cfg else {}).items()
                                  if v is not None and k not in ("hf_hub_id", "url", "file", "source")}}
    key = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir("timm_configs") / key
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "config.json", content)
    return folder


def build_timm_tower(config: ClipConfig) -> TimmModel:
    """open_clip's TimmModel, exactly as open_clip's `_build_vision_tower` makes it from the same vision_cfg."""
    v = config.vision_cfg
    name, pretrained = timm_source(config)
    try:
        tower = TimmModel(name, config.embed_dim, image_size=v.image_size, pool=v.timm_pool, proj=v.timm_proj,
                          proj_bias=v.timm_proj_bias, drop=v.timm_drop, drop_path=v.timm_drop_path,
                          pretrained=pretrained)
    except RuntimeError as e:
        raise ValueError(f"vision_cfg.timm_model_name={v.timm_model_name!r}: {e}. Fix: a name from "
                         "timm.list_models(), or local-dir:<folder>") from None
    except OSError as e:  # the hub's weights: not downloadable here and not in the cache
        raise ValueError(f"vision_cfg.timm_model_name={v.timm_model_name!r}: cannot load its pretrained weights "
                         f"({str(e).splitlines()[0]}). Fix: huggingface-cli download timm/<name> --local-dir "
                         "<folder> where there is network, then set vision_cfg.pretrained to that folder") from None
    size = tower.trunk.pretrained_cfg.get("input_size", (3, v.image_size, v.image_size))[-1]
    if tower.trunk.pretrained_cfg.get("fixed_input_size") and size != v.image_size:
        raise ValueError(f"vision_cfg.image_size={v.image_size}, but timm model {v.timm_model_name} takes {size}px "
                         f"images. Fix: image_size {size} (or, for a new randomly initialised tower, timm_model_args "
                         f"{{\"img_size\": {v.image_size}}}); position embeddings of timm weights are not resized")
    return tower


def timm_trunk_args(config: ClipConfig) -> tuple[str, dict]:
    """(architecture, model arguments) that rebuild the trunk without its folder."""
    v = config.vision_cfg
    folder = v.pretrained or (v.timm_model_name[len(LOCAL_DIR):] if v.timm_model_name.startswith(LOCAL_DIR) else None)
    if folder is None:
        return v.timm_model_name, dict(v.timm_model_args or {})
    folder_cfg = read_timm_folder_config(folder)
    return folder_cfg["architecture"], dict(folder_cfg.get("model_args") or {})


# --- text: transformers -----------------------------------------------------------------------------------------------
def _check_source(name: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise ValueError(f"text_cfg.hf_model_name={name!r}: no transformers model folder there "
                         f"({Path(name).expanduser() / 'config.json'} not found). " + HF_FIX)


def hf_text_config(config: ClipConfig):
    """The text model's transformers config: the one the checkpoint carries, else its folder's / hub's."""
    from transformers import AutoConfig
    t = config.text_cfg
    if t.hf_config is not None:
        data = dict(t.hf_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    _check_source(t.hf_model_name)
    try:
        return AutoConfig.from_pretrained(t.hf_model_name)
    except OSError as e:
        raise ValueError(f"text_cfg.hf_model_name={t.hf_model_name!r}: {str(e).splitlines()[0]}. " + HF_FIX) from None


def build_hf_text_tower(config: ClipConfig) -> HFTextEncoder:
    """open_clip's HFTextEncoder: with hf_model_pretrained its own from_pretrained path (as open_clip builds it),
    else the same modules from the config alone (random init; a checkpoint fills them)."""
    t = config.text_cfg
    hf_config = hf_text_config(config)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"text_cfg.hf_model_name={t.hf_model_name!r} is an encoder-decoder model "
                         f"({hf_config.model_type}); MiniClip takes encoder-only text models (BERT, RoBERTa, XLM-R...)")
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions and t.context_length > positions:
        raise ValueError(f"text_cfg.context_length={t.context_length} exceeds the text model's "
                         f"max_position_embeddings={positions}. Fix: context_length <= {positions}")
    width = getattr(hf_config, "hidden_size", None)
    if t.hf_proj_type is None and width != config.embed_dim:
        raise ValueError(f"text_cfg.hf_proj_type=None needs the text width ({width}) to equal embed_dim "
                         f"({config.embed_dim}). Fix: hf_proj_type 'linear' or 'mlp'")
    if t.hf_model_pretrained and t.hf_config is None:
        try:
            return HFTextEncoder(t.hf_model_name, config.embed_dim, pooler_type=t.hf_pooler_type,
                                 proj_type=t.hf_proj_type, pretrained=True)
        except OSError as e:
            raise ValueError(f"text_cfg.hf_model_name={t.hf_model_name!r}: cannot load its weights "
                             f"({str(e).splitlines()[0]}). " + HF_FIX) from None
    tower = HFTextEncoder(t.hf_model_name, config.embed_dim, config=hf_config, pooler_type=t.hf_pooler_type,
                          proj_type=t.hf_proj_type)
    if t.hf_pooler_type != "cls_pooler" and getattr(tower.transformer, "pooler", None) is not None:
        tower.transformer.pooler = None  # open_clip builds the model's pooler only for cls_pooler (add_pooling_layer)
    return tower


def encode_hf_text(tower: HFTextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """HFTextEncoder.forward with the tokenizer's attention mask (it derives one from pad_token_id, which some
    models lack). (B, L) -> (B, D)."""
    if attention_mask is None:
        attention_mask = input_ids.ne(tower.config.pad_token_id).long()  # (B, L), as HFTextEncoder.forward
    out = tower.transformer(input_ids=input_ids, attention_mask=attention_mask)
    return tower.proj(tower.pooler(out, attention_mask))  # (B, W) -> (B, D)


def lock_hf_text_tower(tower: HFTextEncoder, unlocked_layers: int = 0) -> None:
    """Freeze the text model (LayerNorms too, as open_clip); the projection stays trainable. With unlocked_layers,
    its last N encoder layers train as well."""
    if not unlocked_layers:
        tower.lock(0)
        return
    layers = getattr(getattr(tower.transformer, "encoder", tower.transformer), "layer", None)
    if layers is None:
        raise ValueError(f"lock_text_unlocked_layers: no encoder.layer list in {type(tower.transformer).__name__}; "
                         "lock the whole text tower (0) instead")
    tower.transformer.requires_grad_(False)
    for layer in list(layers)[-unlocked_layers:]:
        layer.requires_grad_(True)
    if getattr(tower.transformer, "pooler", None) is not None:
        tower.transformer.pooler.requires_grad_(True)


# --- checkpoints ------------------------------------------------------------------------------------------------------
def self_contained_config(config: ClipConfig) -> ClipConfig:
    """A model's config as a checkpoint stores it: the towers rebuilt from the config alone (timm architecture + model
    arguments, the text model's own config), no weights loaded at construction (the checkpoint holds them)."""
    config = copy.deepcopy(config)
    if config.vision_cfg.is_timm:
        v = config.vision_cfg
        v.timm_model_name, v.timm_model_args = timm_trunk_args(config)
        v.timm_model_args = v.timm_model_args or None
        v.pretrained, v.timm_model_pretrained = None, False
    if config.text_cfg.tower == "hf":
        t = config.text_cfg
        t.hf_config = hf_text_config(config).to_diff_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
            t.hf_config.pop(key, None)
        t.hf_model_pretrained = False
    return config
