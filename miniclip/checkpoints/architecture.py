"""Architecture inference: the `ClipConfig` a state dict (already under MiniClip's names) was built with, read from
tensor shapes the way OpenAI's `build_model` does, plus open_clip's own `model_cfg` JSON turned into a `ClipConfig`.

Shapes are read by majority: the layer count is the run of consecutive, complete blocks from 0 and a width is the
one most tensors agree on, so one stray or damaged tensor is reported as itself (by the validator) instead of
turning every other tensor into a mismatch. Shapes cannot tell the attention head count: like OpenAI's
`build_model`, heads = width / 64 (64-wide heads), a convention every published CLIP follows. Leaves out on
purpose: inferring timm / transformers towers from shapes (their configs say what they are) and attentional poolers.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter

import torch

from miniclip.checkpoints.io import CheckpointError
from miniclip.config import CHINESE_CLIP_CONTEXT_LENGTH, ClipConfig, PreprocessConfig, TextConfig, VisionConfig

logger = logging.getLogger(__name__)

HEAD_WIDTH = 64  # OpenAI's convention for every CLIP (and BERT-base / large heads)

V = "image_encoder.visual."
T = "text_encoder."


def _count_blocks(state: dict, prefix: str) -> int:
    """Number of `<prefix><i>.` blocks (resblocks / BERT layers): the consecutive run from block 0, ending before
    a gap or a block with fewer than half the tensors of a typical block. Blocks past it are logged; their keys
    are then the unexpected ones the validator names."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    per_block = Counter(int(m.group(1)) for k in state if (m := pattern.match(k)))
    if not per_block:
        return 0
    typical = Counter(per_block.values()).most_common(1)[0][0]  # tensors per block, as most blocks have
    layers = 0
    while per_block.get(layers, 0) * 2 > typical:
        layers += 1
    stray = sorted(i for i in per_block if i >= layers)
    if stray:
        logger.warning("%s: %d consecutive layers (0-%d, %d tensors each); block(s) %s (%s tensor(s)) do not "
                       "continue them and are left out of the architecture", prefix, layers, layers - 1, typical,
                       stray[:5], sum(per_block[i] for i in stray))
    return layers


def _majority(state: dict, where: list[tuple[str, int]], what: str) -> int:
    """The size most of the (key, dim) tensors present agree on; the ones that disagree are logged by name."""
    votes = [(state[key].shape[dim], key) for key, dim in where if key in state and state[key].ndim > dim]
    if not votes:
        raise CheckpointError(f"cannot infer the {what}: none of {[k for k, _ in where[:3]]}... is present. "
                              "Fix: pass config=<model config name or file> explicitly.")
    size = Counter(v for v, _ in votes).most_common(1)[0][0]
    odd = [f"{key} ({value})" for value, key in votes if value != size]
    if odd:
        logger.warning("%s: %d tensors say %d, %d disagree: %s", what, len(votes) - len(odd), size, len(odd),
                       ", ".join(odd[:5]))
    return size


def _layer_norms(state: dict, prefix: str) -> list[tuple[str, int]]:
    """The LayerNorm weights / biases under `prefix` (transformer.resblocks.*.ln_1 / ln_2, ln_pre, ln_post,
    ln_final): each is one vote for the tower width."""
    return [(k, 0) for k in state if k.startswith(prefix) and re.search(r"(^|\.)ln_[a-z0-9]+\.(weight|bias)$", k)]


def _get(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"cannot infer the architecture ({what}): key {key!r} is missing. "
                              "Fix: pass config=<model config name or file> explicitly.")
    return state[key]


def _square_grid(n_tokens: int, key: str) -> int:
    grid = math.isqrt(n_tokens - 1)
    if grid * grid + 1 != n_tokens:
        raise CheckpointError(f"cannot infer the image size: {key} has {n_tokens} rows, not 1 + a square grid")
    return grid


def _head_width(width: int, where: str) -> int:
    if width % HEAD_WIDTH == 0:
        return HEAD_WIDTH
    head_width = max(d for d in range(1, HEAD_WIDTH + 1) if width % d == 0)
    logger.warning("%s width %d is not a multiple of %d: assuming %d-wide attention heads; pass config= if wrong",
                   where, width, HEAD_WIDTH, head_width)
    return head_width


def infer_vision(state: dict) -> tuple[VisionConfig, int]:
    """(VisionConfig, embed_dim) of a ViT (`proj` present) or a ModifiedResNet (`attnpool` present)."""
    if V + "proj" in state or V + "class_embedding" in state:
        conv1 = _get(state, V + "conv1.weight", "ViT patch embedding")  # (W, 3, P, P)
        patch = conv1.shape[-1]
        width = _majority(state, [(V + "conv1.weight", 0), (V + "class_embedding", 0), (V + "positional_embedding", 1),
                                  (V + "proj", 0)] + _layer_norms(state, V), "vision width")
        grid = _square_grid(_get(state, V + "positional_embedding", "ViT grid").shape[0], V + "positional_embedding")
        layers = _count_blocks(state, V + "transformer.resblocks.")
        mlp_width = _majority(state, [(V + f"transformer.resblocks.{i}.mlp.c_fc.weight", 0) for i in range(layers)],
                              "vision MLP width")  # c_fc: (W * r, W)
        vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch,
                              head_width=_head_width(width, "vision"), mlp_ratio=mlp_width / width)
        return vision, _get(state, V + "proj", "ViT projection").shape[1]
    if V + "attnpool.positional_embedding" in state or V + "layer1.0.conv1.weight" in state:
        width = _get(state, V + "layer1.0.conv1.weight", "ResNet width").shape[0]
        layers = [_count_blocks(state, V + f"layer{i}.") for i in (1, 2, 3, 4)]
        pos = _get(state, V + "attnpool.positional_embedding", "ResNet attention pool")
        grid = _square_grid(pos.shape[0], V + "attnpool.positional_embedding")
        vision = VisionConfig(image_size=grid * 32, layers=layers, width=width, patch_size=None,
                              head_width=_head_width(width * 32, "ResNet attention-pool"))
        return vision, _get(state, V + "attnpool.c_proj.weight", "ResNet output").shape[0]
    raise CheckpointError("cannot infer the image tower: no image_encoder.visual.proj (ViT) nor "
                          "image_encoder.visual.attnpool.* (ResNet) key. Fix: pass config= explicitly.")


def infer_text(state: dict) -> tuple[TextConfig, int]:
    """(TextConfig, embed_dim) of open_clip's causal transformer or Chinese-CLIP's BERT."""
    if T + "bert.embeddings.word_embeddings.weight" in state:
        words = state[T + "bert.embeddings.word_embeddings.weight"]  # (vocab, W)
        width = words.shape[1]
        prefix = T + "bert.encoder.layer."
        text = TextConfig(
            tower="bert", context_length=CHINESE_CLIP_CONTEXT_LENGTH, vocab_size=words.shape[0], width=width,
            heads=width // _head_width(width, "BERT"), layers=_count_blocks(state, prefix),
            intermediate_size=_get(state, prefix + "0.intermediate.dense.weight", "BERT MLP").shape[0],
            max_position_embeddings=_get(state, T + "bert.embeddings.position_embeddings.weight", "BERT").shape[0],
            type_vocab_size=_get(state, T + "bert.embeddings.token_type_embeddings.weight", "BERT").shape[0])
        return text, _get(state, T + "text_projection", "text projection").shape[1]
    tokens = _get(state, T + "token_embedding.weight", "text tower")  # (vocab, W)
    width = _majority(state, [(T + "token_embedding.weight", 1), (T + "positional_embedding", 1),
                              (T + "text_projection", 0)] + _layer_norms(state, T), "text width")
    layers = _count_blocks(state, T + "transformer.resblocks.")
    mlp_width = _majority(state, [(T + f"transformer.resblocks.{i}.mlp.c_fc.weight", 0) for i in range(layers)],
                          "text MLP width")
    text = TextConfig(tower="transformer", context_length=_get(state, T + "positional_embedding", "context").shape[0],
                      vocab_size=tokens.shape[0], width=width, heads=width // _head_width(width, "text"),
                      layers=layers, mlp_ratio=mlp_width / width)
    return text, _get(state, T + "text_projection", "text projection").shape[1]


def infer_config(state: dict, quick_gelu: bool, name: str | None = None) -> ClipConfig:
    """The ClipConfig whose MiniClip has exactly the shapes of `state` (MiniClip names)."""
    vision, embed_dim = infer_vision(state)
    text, text_dim = infer_text(state)
    if text_dim != embed_dim:
        raise CheckpointError(f"the image tower projects to {embed_dim} dimensions and the text tower to {text_dim}: "
                              "not a CLIP checkpoint of one embedding space")
    bert = text.tower == "bert"
    bias = state.get("logit_bias.logit_bias")
    config = ClipConfig(
        embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu,
        preprocess_cfg=PreprocessConfig(resize_mode="squash" if bert else "shortest"),
        init_logit_bias=float(bias.reshape(())) if bias is not None else None, name=name)
    return config


# --- open_clip's model_cfg (open_clip_config.json of a hub folder) ------------------------------------------------
# Keys open_clip writes that change nothing MiniClip builds (training-time or default-valued options).
_HARMLESS = {"patch_dropout", "output_tokens", "output_dim", "no_ln_pre", "final_ln_after_pool", "timm_model_pretrained",
             "hf_model_pretrained", "norm_kwargs", "act_kwargs", "teacher_width", "custom_text", "cast_dtype"}
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_DEFAULT_VALUED = {"ls_init_value": None, "attentional_pool": False, "pool_type": None, "input_patchnorm": False,
                   "global_average_pool": False, "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
                   "proj_bias": False, "pool_type_text": None, "timm_model_name": None, "hf_model_name": None}


# open_clip's options for timm / transformers towers, the same names in VisionConfig / TextConfig.
_TIMM_KEYS = {"timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
              "image_size"}
_HF_TEXT_KEYS = {"hf_model_name", "hf_pooler_type", "hf_proj_type", "context_length"}


def _any_towers(model_cfg: dict, where: str) -> tuple[dict | None, dict | None]:
    """The vision_cfg / text_cfg of open_clip's timm / transformers towers (None for its own towers). Weights come
    from the checkpoint, never downloaded; image size, context length and mean / std default to open_clip's."""
    vision = text = None
    if model_cfg["vision_cfg"].get("timm_model_name"):
        vision = {"image_size": 224, **_pick(model_cfg["vision_cfg"], _TIMM_KEYS, where + " vision_cfg")}
    text_in = model_cfg["text_cfg"]
    if text_in.get("hf_model_name"):
        tokenizer = text_in.get("hf_tokenizer_name")
        if tokenizer not in (None, text_in["hf_model_name"]):
            raise CheckpointError(f"{where}: text_cfg.hf_tokenizer_name={tokenizer!r} differs from hf_model_name; "
                                  "MiniClip uses the text model's own tokenizer")
        picked = _pick({k: v for k, v in text_in.items() if k != "hf_tokenizer_name"}, _HF_TEXT_KEYS,
                       where + " text_cfg")
        text = {"context_length": 77, "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp", **picked,
                "hf_model_pretrained": False}
    return vision, text


def _pick(cfg: dict, allowed: set, where: str) -> dict:
    out = {}
    for key, value in cfg.items():
        if key in allowed:
            out[key] = list(value) if isinstance(value, tuple) else value
        elif key in _HARMLESS or (key in _DEFAULT_VALUED and value in (_DEFAULT_VALUED[key], None)):
            continue
        elif key == "pool_type" and value in ("argmax", "tok"):
            continue  # the default pooling of each tower
        else:
            raise CheckpointError(f"{where}: open_clip option {key}={value!r} is not supported by MiniClip "
                                  "(it builds plain ViT / ModifiedResNet / text-transformer towers only)")
    return out


def config_from_open_clip(model_cfg: dict, preprocess_cfg: dict | None = None, where: str = "open_clip config",
                          name: str | None = None) -> ClipConfig:
    """open_clip's `{"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", ...}` -> ClipConfig."""
    model_cfg = dict(model_cfg)
    unknown = set(model_cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale",
                                "init_logit_bias", "custom_text", "cast_dtype"}
    if unknown:
        raise CheckpointError(f"{where}: unsupported model_cfg key(s) {sorted(unknown)} (MiniClip builds plain CLIPs)")
    timm_vision, hf_text = _any_towers(model_cfg, where)
    vision = timm_vision or _pick(model_cfg["vision_cfg"], _VISION_KEYS, where + " vision_cfg")
    text = hf_text or _pick(model_cfg["text_cfg"], _TEXT_KEYS, where + " text_cfg")
    if not timm_vision:
        vision["patch_size"] = None if isinstance(vision.get("layers", 12), list) else vision.get("patch_size", 16)
    pre = {"mean": list(PreprocessConfig.mean), "std": list(PreprocessConfig.std)} if timm_vision else {}
    for key in ("mean", "std", "resize_mode"):
        if preprocess_cfg and key in preprocess_cfg:
            pre[key] = preprocess_cfg[key]
    data = dict(embed_dim=model_cfg["embed_dim"], quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                vision_cfg=vision, text_cfg=text, preprocess_cfg=pre, name=name)
    for key in ("init_logit_scale", "init_logit_bias"):
        if model_cfg.get(key) is not None:
            data[key] = model_cfg[key]
    return checkpoint_config(data, where)


def checkpoint_config(data: dict, where: str) -> ClipConfig:
    """ClipConfig.from_dict for a config a checkpoint carries: a bad one is a CheckpointError naming `where`."""
    try:
        return ClipConfig.from_dict(data, where=where)
    except ValueError as e:
        raise CheckpointError(str(e) if where in str(e) else f"{where}: {e}") from None


def architecture(config: ClipConfig) -> dict:
    """The fields that decide parameter shapes: two configs with equal architecture() load the same checkpoints."""
    v, t = config.vision_cfg, config.text_cfg
    arch = {"embed dim": config.embed_dim, "image tower": "ResNet" if v.is_resnet else "ViT",
            "vision layers": v.layers, "vision width": v.width, "patch size": v.patch_size if not v.is_resnet else None,
            "image size": v.image_size, "vision mlp ratio": v.mlp_ratio if not v.is_resnet else None,
            "text tower": t.tower, "text layers": t.layers, "text width": t.width, "vocab size": t.vocab_size}
    if t.tower == "bert":
        arch.update({"text intermediate size": t.intermediate_size, "max positions": t.max_position_embeddings})
    else:
        arch.update({"context length": t.context_length, "text mlp ratio": t.mlp_ratio})
    arch["logit bias"] = config.init_logit_bias is not None
    return arch
