"""Hugging Face `transformers.CLIPModel` <-> MiniClip: parameter names, tensor layouts and config.json content.

Pure functions on state dicts and config dicts; reading files and validating the result is checkpoints.py's job.
Leaves out on purpose: ResNet image towers (HF CLIP has none) and the other HF CLIP heads (vision-only,
text-only, classification models). The vision-tower helpers are shared with convert_chinese.py.
"""
from __future__ import annotations

import math
import re

import torch
from transformers import CLIPConfig

from miniclip.config import ClipConfig, TextConfig, VisionConfig

Tensor = torch.Tensor
_QKV = ("q_proj", "k_proj", "v_proj")  # HF keeps three Linears; open_clip's MultiheadAttention stacks them (q; k; v)
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OURS_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# Inside one transformer block: HF sub-module name -> open_clip sub-module name.
_BLOCK_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}
# Outside the blocks, per tower: HF name (after `vision_model.` / `text_model.`) -> open_clip name.
VISION_NAMES = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",  # sic: HF's spelling
                "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
TEXT_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# Buffers that older transformers versions saved (persistent position_ids / token_type_ids); never weights.
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip's towers use


def put(out: dict, key: str, value: Tensor, source: str) -> None:
    """`out[key] = value`, refusing to overwrite: two checkpoint keys must never land on one parameter."""
    if key in out:
        raise ValueError(f"checkpoint keys collide: {source!r} maps to {key!r}, which another key already filled. "
                         "The state dict mixes two layouts; load a checkpoint of one layout only.")
    out[key] = value


def transposed(value: Tensor) -> Tensor:
    """HF stores projections as Linear weights (out, in); open_clip as matrices (in, out). 2-D only: any other
    shape is passed on unchanged for the validator to report."""
    return value.t().contiguous() if value.ndim == 2 else value


def _block_key_to_ours(i: str, sub: str) -> str | None:
    for hf_name, our_name in _BLOCK_NAMES.items():
        if sub.startswith(hf_name + "."):
            return f"transformer.resblocks.{i}.{our_name}{sub[len(hf_name):]}"
    return None


def hf_tower_to_open_clip(state: dict, hf_prefix: str, our_prefix: str, names: dict, out: dict,
                          ignored: list) -> None:
    """Move every key under `hf_prefix` (one HF CLIP encoder tower) to its open_clip name under `our_prefix`.

    q/k/v projections are concatenated into `attn.in_proj_*`; keys not recognised keep their original name so
    the strict validator reports them; an incomplete q/k/v triple is passed on the same way.
    """
    qkv: dict[tuple[str, str], dict[str, str]] = {}  # (layer, "weight"|"bias") -> {"q_proj": checkpoint key}
    for key in [k for k in state if k.startswith(hf_prefix)]:
        rest = key[len(hf_prefix):]
        if rest in IGNORED_BUFFERS:
            ignored.append(key)
            continue
        if rest in names:
            put(out, our_prefix + names[rest], state[key], key)
            continue
        match = _HF_LAYER.fullmatch(rest)
        if match is None:
            put(out, key, state[key], key)
            continue
        i, sub = match.groups()
        module, _, kind = sub.rpartition(".")
        proj = module.removeprefix("self_attn.")
        if module.startswith("self_attn.") and proj in _QKV and kind in ("weight", "bias"):
            qkv.setdefault((i, kind), {})[proj] = key
            continue
        ours = _block_key_to_ours(i, sub)
        put(out, our_prefix + ours if ours else key, state[key], key)
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            for key in parts.values():
                put(out, key, state[key], key)
            continue
        tensors = [state[parts[p]] for p in _QKV]
        if len({tuple(t.shape) for t in tensors}) != 1:
            shapes = {parts[p]: tuple(state[parts[p]].shape) for p in _QKV}
            raise ValueError(f"q/k/v projections of layer {i} under {hf_prefix!r} differ in shape: {shapes}")
        put(out, f"{our_prefix}transformer.resblocks.{i}.attn.in_proj_{kind}", torch.cat(tensors), parts["q_proj"])


def open_clip_tower_to_hf(state: dict, our_prefix: str, hf_prefix: str, names: dict, out: dict) -> None:
    """Inverse of `hf_tower_to_open_clip`: pops the tower's keys from `state` (a mutable copy) into `out`."""
    inverse = {ours: hf for hf, ours in names.items()}
    block_inverse = {ours: hf for hf, ours in _BLOCK_NAMES.items()}
    for key in [k for k in state if k.startswith(our_prefix)]:
        rest = key[len(our_prefix):]
        if rest in inverse:
            out[hf_prefix + inverse[rest]] = state.pop(key)
            continue
        match = _OURS_BLOCK.fullmatch(rest)
        if match is None:
            continue  # left in `state`: the caller reports it
        i, sub = match.groups()
        layer = f"{hf_prefix}encoder.layers.{i}."
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = sub.rsplit("_", 1)[1]
            # clone: safetensors refuses to save views that share one storage
            for proj, part in zip(_QKV, state.pop(key).chunk(3)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part.clone()
            continue
        for our_name, hf_name in block_inverse.items():
            if sub.startswith(our_name + "."):
                out[layer + hf_name + sub[len(our_name):]] = state.pop(key)
                break


def pop_required(state: dict, key: str) -> Tensor:
    if key not in state:
        raise ValueError(f"MiniClip state dict has no {key!r}: pass the state_dict() of the MiniClip built from "
                         "this config")
    return state.pop(key)


def check_model_type(hf_config: dict, expected: str, hint: str) -> None:
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type != expected:
        raise ValueError(f"config.json has model_type={model_type!r}, this converter reads {expected!r}. {hint}")


def hf_clip_to_miniclip(state: dict[str, Tensor], hf_config: dict) -> tuple[dict[str, Tensor], list[str]]:
    """A `CLIPModel` state dict -> (MiniClip state dict, keys deliberately dropped).

    Dropped: `{text,vision}_model.embeddings.position_ids`, buffers older transformers versions saved (they hold
    arange(n), which the model rebuilds). Unrecognised keys are returned under their original name.
    """
    check_model_type(hf_config, "clip", "For Chinese-CLIP use miniclip.checkpoints.chinese_clip.hf_chinese_clip_to_miniclip.")
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    hf_tower_to_open_clip(state, "vision_model.", "image_encoder.visual.", VISION_NAMES, out, ignored)
    hf_tower_to_open_clip(state, "text_model.", "text_encoder.", TEXT_NAMES, out, ignored)
    heads = {"visual_projection.weight": "image_encoder.visual.proj", "text_projection.weight":
             "text_encoder.text_projection", "logit_scale": "logit_scale.logit_scale"}
    for key, value in state.items():
        if key.startswith(("vision_model.", "text_model.")):
            continue
        if key in heads:
            put(out, heads[key], transposed(value) if key.endswith("projection.weight") else value, key)
        else:
            put(out, key, value, key)
    return out, ignored


def check_hf_exportable(config: ClipConfig, text_tower: str, target: str) -> None:
    if config.vision_cfg.is_resnet:
        raise ValueError(f"{target} has no ResNet image tower, and this model's vision_cfg.layers="
                         f"{config.vision_cfg.layers} is a ResNet: save it with format='miniclip' (or 'open_clip').")
    if config.text_cfg.tower != text_tower:
        raise ValueError(f"{target} needs text_cfg.tower={text_tower!r}, this model has {config.text_cfg.tower!r}: "
                         "use the other Hugging Face converter, or format='miniclip'.")
    if config.init_logit_bias is not None:
        raise ValueError(f"{target} has no logit_bias (sigmoid-loss models): save with format='miniclip'.")


def miniclip_to_hf_clip(state: dict[str, Tensor], config: ClipConfig) -> dict[str, Tensor]:
    """A MiniClip state dict (ViT image tower, transformer text tower) -> `CLIPModel` names and layouts; exact."""
    check_hf_exportable(config, "transformer", "transformers.CLIPModel")
    state, out = dict(state), {}
    open_clip_tower_to_hf(state, "image_encoder.visual.", "vision_model.", VISION_NAMES, out)
    open_clip_tower_to_hf(state, "text_encoder.", "text_model.", TEXT_NAMES, out)
    return add_hf_heads(state, out, "CLIPModel")


def add_hf_heads(state: dict[str, Tensor], out: dict[str, Tensor], target: str) -> dict[str, Tensor]:
    """The parts both HF exports share: projections (Linear weights, transposed) and the logit scale; then every
    MiniClip key must have been used."""
    out["visual_projection.weight"] = transposed(pop_required(state, "image_encoder.visual.proj"))
    out["text_projection.weight"] = transposed(pop_required(state, "text_encoder.text_projection"))
    out["logit_scale"] = pop_required(state, "logit_scale.logit_scale")
    if state:
        raise ValueError(f"no {target} name for MiniClip key(s) {sorted(state)[:5]} ({len(state)} in all); "
                         "was the state dict made by MiniClip(config) for this config?")
    return out


# --- config.json ------------------------------------------------------------------------------------------------

def activation_from_hf(acts: dict[str, str]) -> bool:
    """`hidden_act` of the towers (name -> value) -> MiniClip's `quick_gelu` flag (one flag for both towers)."""
    known = {"quick_gelu": True, "gelu": False}  # open_clip's QuickGELU / nn.GELU (exact erf form)
    for where, act in acts.items():
        if act not in known:
            raise ValueError(f"{where}.hidden_act={act!r} is not supported: MiniClip's open_clip towers use one "
                             f"of {list(known)}")
    if len({known[a] for a in acts.values()}) > 1:
        raise ValueError(f"the towers use different activations {acts}: MiniClip has one quick_gelu flag for both")
    return known[next(iter(acts.values()))]


def check_layer_norm_eps(where: str, eps: float) -> None:
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        raise ValueError(f"{where}.layer_norm_eps={eps} is not supported: open_clip's towers use {LAYER_NORM_EPS}")


def mlp_ratio(where: str, hidden: int, intermediate: int) -> float:
    """open_clip sizes the MLP as int(width * mlp_ratio); refuse sizes that ratio cannot reproduce."""
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        raise ValueError(f"{where}.intermediate_size={intermediate} is not int(hidden_size * mlp_ratio) for any "
                         f"float ratio open_clip would build (hidden_size={hidden})")
    return ratio


def vision_config_from_hf(vision, where: str = "vision_config") -> VisionConfig:
    """A `CLIPVisionConfig`-like object -> VisionConfig (the ViT fields HF CLIP and Chinese-CLIP share)."""
    if vision.num_channels != 3:
        raise ValueError(f"{where}.num_channels={vision.num_channels}: MiniClip reads RGB images (3 channels)")
    check_layer_norm_eps(where, vision.layer_norm_eps)
    if vision.hidden_size % vision.num_attention_heads:
        raise ValueError(f"{where}: hidden_size={vision.hidden_size} is not divisible by "
                         f"num_attention_heads={vision.num_attention_heads}")
    return VisionConfig(image_size=vision.image_size, layers=vision.num_hidden_layers, width=vision.hidden_size,
                        patch_size=vision.patch_size, head_width=vision.hidden_size // vision.num_attention_heads,
                        mlp_ratio=mlp_ratio(where, vision.hidden_size, vision.intermediate_size))


def check_eos_pooling(text) -> None:
    """MiniClip pools the text at the highest token id (the EOT, as open_clip / OpenAI do). HF CLIP pools at the
    highest id when `eos_token_id == 2` (configs written before transformers PR #24773) and otherwise at the first
    `eos_token_id`: the same token exactly when the EOT is the vocabulary's last id (49407 for CLIP's BPE)."""
    eos, last = text.eos_token_id, text.vocab_size - 1
    if eos not in (2, last):
        raise ValueError(f"text_config.eos_token_id={eos}: MiniClip pools at the highest id (the EOT, "
                         f"{last} = vocab_size - 1), HF at the first eos_token_id; they differ for this model. "
                         f"Set eos_token_id to {last} in config.json if the EOT is the vocabulary's last token.")


def hf_clip_config_to_miniclip(hf_config: dict) -> ClipConfig:
    """`CLIPModel` config.json content -> ClipConfig (ViT + causal text transformer, OpenAI preprocessing)."""
    check_model_type(hf_config, "clip",
                     "For Chinese-CLIP use miniclip.checkpoints.chinese_clip.hf_chinese_clip_config_to_miniclip.")
    cfg = CLIPConfig.from_dict(hf_config)  # fills HF's defaults for keys older files leave out
    text, vision = cfg.text_config, cfg.vision_config
    quick_gelu = activation_from_hf({"text_config": text.hidden_act, "vision_config": vision.hidden_act})
    check_layer_norm_eps("text_config", text.layer_norm_eps)
    check_eos_pooling(text)
    text_cfg = TextConfig(tower="transformer", context_length=text.max_position_embeddings,
                          vocab_size=text.vocab_size, width=text.hidden_size, heads=text.num_attention_heads,
                          layers=text.num_hidden_layers,
                          mlp_ratio=mlp_ratio("text_config", text.hidden_size, text.intermediate_size))
    return ClipConfig(embed_dim=cfg.projection_dim, vision_cfg=vision_config_from_hf(vision), text_cfg=text_cfg,
                      quick_gelu=quick_gelu, init_logit_scale=cfg.logit_scale_init_value)


def vision_config_to_hf(config: ClipConfig, model_type: str) -> dict:
    v = config.vision_cfg
    return dict(model_type=model_type, hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                num_hidden_layers=v.layers, num_attention_heads=v.heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=3, hidden_act="quick_gelu" if config.quick_gelu else "gelu",
                layer_norm_eps=LAYER_NORM_EPS, projection_dim=config.embed_dim)


def miniclip_config_to_hf_clip(config: ClipConfig) -> dict:
    """ClipConfig -> config.json content `CLIPModel.from_pretrained` reads. The EOT is the last id
    (eos_token_id = vocab_size - 1), so HF's first-eos pooling picks MiniClip's argmax token."""
    check_hf_exportable(config, "transformer", "transformers.CLIPModel")
    t = config.text_cfg
    text = dict(model_type="clip_text_model", vocab_size=t.vocab_size, hidden_size=t.width,
                intermediate_size=int(t.width * t.mlp_ratio), num_hidden_layers=t.layers,
                num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act="quick_gelu" if config.quick_gelu else "gelu", layer_norm_eps=LAYER_NORM_EPS,
                projection_dim=config.embed_dim, pad_token_id=1, bos_token_id=t.vocab_size - 2,
                eos_token_id=t.vocab_size - 1)
    return dict(model_type="clip", architectures=["CLIPModel"], projection_dim=config.embed_dim,
                logit_scale_init_value=config.init_logit_scale, text_config=text,
                vision_config=vision_config_to_hf(config, "clip_vision_model"))
