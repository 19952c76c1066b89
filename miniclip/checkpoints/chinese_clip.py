"""Chinese-CLIP -> MiniClip names: cn_clip's own `.pt` layout (also its FlashAttention variant) and transformers'
`ChineseCLIPModel` (both directions, with its config.json).

Pure functions on state dicts and config dicts; reading files and validating the result is checkpoints.py's job.
Leaves out on purpose: writing cn_clip's `.pt` layout, and HF export of ResNet towers (ChineseCLIPModel is ViT only).
"""
from __future__ import annotations

import re

import torch
from transformers import ChineseCLIPConfig

from miniclip.config import CHINESE_CLIP_CONTEXT_LENGTH, ClipConfig, PreprocessConfig, TextConfig
from miniclip.checkpoints.hf_clip import (IGNORED_BUFFERS, VISION_NAMES, activation_from_hf, add_hf_heads, check_hf_exportable,
                         check_model_type, hf_tower_to_open_clip, open_clip_tower_to_hf, put, transposed,
                         vision_config_from_hf, vision_config_to_hf)

Tensor = torch.Tensor
# cn_clip with use_flash_attention swaps nn.MultiheadAttention / BERT self-attention for flash_attn's FlashMHA,
# whose fused `Wqkv` Linear stacks (q; k; v) rows like `in_proj_weight`, and whose `out_proj` replaces BERT's
# `attention.output.dense` (see cn_clip.clip.model.convert_state_dict).
_FLASH_VISUAL = re.compile(r"(visual\.transformer\.resblocks\.\d+\.attn\.)Wqkv\.(weight|bias)")
_FLASH_BERT_QKV = re.compile(r"(bert\.encoder\.layer\.\d+\.attention\.)self\.Wqkv\.(weight|bias)")
_FLASH_BERT_OUT = re.compile(r"(bert\.encoder\.layer\.\d+\.attention\.)self\.out_proj\.(weight|bias)")
_BERT_BUFFERS = {f"bert.{name}" for name in IGNORED_BUFFERS}


def _flash_bert_qkv(key: str, value: Tensor, out: dict) -> None:
    """`...attention.self.Wqkv.{kind}` (3W, ...) -> BERT's separate query / key / value Linears."""
    prefix, kind = _FLASH_BERT_QKV.fullmatch(key).groups()
    if value.ndim == 0 or value.shape[0] % 3:
        put(out, key, value, key)  # not a stacked q/k/v: the validator reports it
        return
    for name, part in zip(("query", "key", "value"), value.chunk(3)):
        put(out, f"text_encoder.{prefix}self.{name}.{kind}", part.clone(), key)


def cn_clip_to_miniclip(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """cn_clip's state dict (`module.` prefix already stripped) -> (MiniClip state dict, keys deliberately dropped).

    Dropped: `bert.pooler.*` (cn_clip never uses the pooler; MiniClip's BERT has none) and BERT's
    `embeddings.position_ids` / `token_type_ids` buffers if a file carries them. Unrecognised keys keep their name.
    """
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if key.startswith("bert.pooler.") or key in _BERT_BUFFERS:
            ignored.append(key)
        elif match := _FLASH_VISUAL.fullmatch(key):
            put(out, f"image_encoder.{match[1]}in_proj_{match[2]}", value, key)
        elif _FLASH_BERT_QKV.fullmatch(key):
            _flash_bert_qkv(key, value, out)
        elif match := _FLASH_BERT_OUT.fullmatch(key):
            put(out, f"text_encoder.{match[1]}output.dense.{match[2]}", value, key)
        elif key.startswith("visual."):
            put(out, "image_encoder." + key, value, key)
        elif key.startswith("bert.") or key == "text_projection":
            put(out, "text_encoder." + key, value, key)
        elif key == "logit_scale":
            put(out, "logit_scale.logit_scale", value, key)
        else:
            put(out, key, value, key)
    return out, ignored


def hf_chinese_clip_to_miniclip(state: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """A `ChineseCLIPModel` state dict -> (MiniClip state dict, keys deliberately dropped).

    Dropped: `text_model.pooler.*` (ChineseCLIPModel builds its text model without a pooler; files written by
    other tools may carry one) and the `embeddings.position_ids` / `token_type_ids` buffers of older files.
    """
    check_model_type(hf_config, "chinese_clip", "For OpenAI-style CLIP use miniclip.checkpoints.hf_clip.hf_clip_to_miniclip.")
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    hf_tower_to_open_clip(state, "vision_model.", "image_encoder.visual.", VISION_NAMES, out, ignored)
    heads = {"visual_projection.weight": "image_encoder.visual.proj",
             "text_projection.weight": "text_encoder.text_projection", "logit_scale": "logit_scale.logit_scale"}
    for key, value in state.items():
        rest = key.removeprefix("text_model.")
        if key.startswith("vision_model."):
            continue
        if key.startswith("text_model.pooler.") or (rest != key and rest in IGNORED_BUFFERS):
            ignored.append(key)
        elif key.startswith(("text_model.embeddings.", "text_model.encoder.")):
            put(out, "text_encoder.bert." + rest, value, key)  # same BertModel names below the prefix
        elif key in heads:
            put(out, heads[key], transposed(value) if key.endswith("projection.weight") else value, key)
        else:
            put(out, key, value, key)
    return out, ignored


def miniclip_to_hf_chinese_clip(state: dict[str, Tensor], config: ClipConfig) -> dict[str, Tensor]:
    """A MiniClip state dict (ViT image tower, BERT text tower) -> `ChineseCLIPModel` names and layouts; exact."""
    check_hf_exportable(config, "bert", "transformers.ChineseCLIPModel")
    state, out = dict(state), {}
    open_clip_tower_to_hf(state, "image_encoder.visual.", "vision_model.", VISION_NAMES, out)
    for key in [k for k in state if k.startswith("text_encoder.bert.")]:
        out["text_model." + key.removeprefix("text_encoder.bert.")] = state.pop(key)
    return add_hf_heads(state, out, "ChineseCLIPModel")


def hf_chinese_clip_config_to_miniclip(hf_config: dict) -> ClipConfig:
    """`ChineseCLIPModel` config.json content -> ClipConfig (ViT + BERT, 52-token context, squashed images).

    The ViT's activation comes from `vision_config.hidden_act` ("quick_gelu" in Chinese-CLIP's releases and HF's
    default); BERT keeps its own `hidden_act` ("gelu") and `layer_norm_eps` (1e-12).
    """
    check_model_type(hf_config, "chinese_clip",
                     "For OpenAI-style CLIP use miniclip.checkpoints.hf_clip.hf_clip_config_to_miniclip.")
    cfg = ChineseCLIPConfig.from_dict(hf_config)  # fills HF's defaults for keys older files leave out
    text, vision = cfg.text_config, cfg.vision_config
    position_type = getattr(text, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"text_config.position_embedding_type={position_type!r}: MiniClip's BERT uses 'absolute'")
    text_cfg = TextConfig(tower="bert", context_length=min(CHINESE_CLIP_CONTEXT_LENGTH, text.max_position_embeddings),
                          vocab_size=text.vocab_size, width=text.hidden_size, heads=text.num_attention_heads,
                          layers=text.num_hidden_layers, intermediate_size=text.intermediate_size,
                          max_position_embeddings=text.max_position_embeddings,
                          type_vocab_size=text.type_vocab_size, hidden_act=text.hidden_act,
                          layer_norm_eps=text.layer_norm_eps)
    return ClipConfig(embed_dim=cfg.projection_dim, vision_cfg=vision_config_from_hf(vision), text_cfg=text_cfg,
                      quick_gelu=activation_from_hf({"vision_config": vision.hidden_act}),
                      preprocess_cfg=PreprocessConfig(resize_mode="squash"),
                      init_logit_scale=cfg.logit_scale_init_value)


def miniclip_config_to_hf_chinese_clip(config: ClipConfig) -> dict:
    """ClipConfig -> config.json content `ChineseCLIPModel.from_pretrained` reads."""
    check_hf_exportable(config, "bert", "transformers.ChineseCLIPModel")
    t = config.text_cfg
    text = dict(model_type="chinese_clip_text_model", vocab_size=t.vocab_size, hidden_size=t.width,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                hidden_act=t.hidden_act, max_position_embeddings=t.max_position_embeddings,
                type_vocab_size=t.type_vocab_size, layer_norm_eps=t.layer_norm_eps, pad_token_id=0)
    return dict(model_type="chinese_clip", architectures=["ChineseCLIPModel"], projection_dim=config.embed_dim,
                logit_scale_init_value=config.init_logit_scale, text_config=text,
                vision_config=vision_config_to_hf(config, "chinese_clip_vision_model"))
