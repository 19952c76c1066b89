"""transformers' `VisionTextDualEncoderModel` (what run_clip.py trains and saves) <-> MiniClip with a timm image
tower and a transformers text tower: parameter names, config.json content, and the layout record's converter.

The dual encoder pools the vision model's `pooler_output` (a timm model's own head pooling) and the text model's
`pooler_output` (BERT's dense + tanh over [CLS]), each followed by a bias-free Linear; in MiniClip's terms that is
timm_pool "" + timm_proj "linear", and hf_pooler_type "cls_pooler" + hf_proj_type "linear". Leaves out on
purpose: dual encoders whose vision model is not a timm model (ViTModel, CLIPVisionModel: other key layouts).
"""
from __future__ import annotations

from pathlib import Path


from miniclip.checkpoints.architecture import checkpoint_config
from miniclip.checkpoints.io import CheckpointError
from miniclip.config import ClipConfig
from miniclip.files import atomic_write_json, save_safetensors

MODEL_TYPE = "vision-text-dual-encoder"
MODEL_CLASS = "VisionTextDualEncoderModel"
# dual encoder name prefix -> MiniClip name prefix; the rest of each key is the timm / transformers module's own.
PREFIXES = {"vision_model.timm_model.": "image_encoder.visual.trunk.", "text_model.": "text_encoder.transformer."}
HEADS = {"visual_projection.weight": "image_encoder.visual.head.proj.weight",
         "text_projection.weight": "text_encoder.proj.weight", "logit_scale": "logit_scale.logit_scale"}
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")


def matches(keys, file, kind) -> bool:
    return any(k.startswith("vision_model.timm_model.") for k in keys)


def dual_encoder_to_miniclip(state: dict) -> tuple[dict, dict]:
    """-> (MiniClip state dict, MiniClip name -> file name). Unknown keys keep their name (the validator reports)."""
    out, origin = {}, {}
    for key, value in state.items():
        new = HEADS.get(key, key)
        for theirs, ours in PREFIXES.items():
            if key.startswith(theirs):
                new = ours + key[len(theirs):]
        out[new], origin[new] = value, key
    return out, origin


def miniclip_to_dual_encoder(state: dict) -> dict:
    back = {ours: theirs for theirs, ours in HEADS.items()}
    out = {}
    for key, value in state.items():
        new = back.get(key)
        for theirs, ours in PREFIXES.items():
            if key.startswith(ours):
                new = theirs + key[len(ours):]
        if new is None:
            raise ValueError(f"{key} has no place in a {MODEL_CLASS} (only the towers, projections, logit scale)")
        out[new] = value
    return out


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _CONFIG_NOISE}


def dual_encoder_config_to_miniclip(hf_config: dict, folder: Path, where: str) -> ClipConfig:
    """config.json of a dual encoder -> ClipConfig (image size and mean / std from the timm model's config)."""
    vision, text = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
    if vision.get("model_type") != "timm_wrapper":
        raise CheckpointError(f"{where}: vision_config.model_type={vision.get('model_type')!r}; MiniClip loads "
                              f"{MODEL_CLASS} folders whose vision model is a timm model ('timm_wrapper'), e.g. "
                              "from_vision_text_pretrained('timm/<name>', '<text model>')")
    if not text.get("model_type"):
        raise CheckpointError(f"{where}: text_config has no model_type")
    vision_cfg = {"timm_model_name": vision["architecture"], "timm_model_args": vision.get("model_args") or None,
                  "timm_pool": "", "timm_proj": "linear"}
    pretrained_cfg = vision.get("pretrained_cfg") or {}
    preprocess = {k: pretrained_cfg[k] for k in ("mean", "std") if k in pretrained_cfg}
    if "input_size" in pretrained_cfg:
        vision_cfg["image_size"] = pretrained_cfg["input_size"][-1]
    text_cfg = {"hf_model_name": str(folder), "hf_model_pretrained": False, "hf_pooler_type": "cls_pooler",
                "hf_proj_type": "linear", "hf_config": _clean(text),
                "context_length": min(text.get("max_position_embeddings") or 512, 512)}
    data = {"embed_dim": hf_config.get("projection_dim", 512), "vision_cfg": vision_cfg, "text_cfg": text_cfg,
            "preprocess_cfg": preprocess, "init_logit_scale": hf_config.get("logit_scale_init_value", 2.6592),
            "name": folder.name}
    return checkpoint_config(data, where)


def check_exportable(config: ClipConfig) -> None:
    v, t = config.vision_cfg, config.text_cfg
    wrong = [f"{name}={value!r} (needs {need!r})" for name, value, need in (
        ("vision_cfg.timm_pool", v.timm_pool, ""), ("vision_cfg.timm_proj", v.timm_proj, "linear"),
        ("vision_cfg.timm_proj_bias", v.timm_proj_bias, False), ("text_cfg.hf_pooler_type", t.hf_pooler_type,
        "cls_pooler"), ("text_cfg.hf_proj_type", t.hf_proj_type, "linear")) if value != need]
    if not v.is_timm or t.tower != "hf":
        wrong.insert(0, "both towers must be timm (vision_cfg.timm_model_name) and transformers (text_cfg.hf_model_name)")
    if config.init_logit_bias is not None:
        wrong.append("a logit bias (sigmoid loss), which the dual encoder has no place for")
    if wrong:
        raise ValueError(f"format='hf' writes a {MODEL_CLASS}, which pools and projects one way: " + "; ".join(wrong)
                         + ". Fix: train with those options, or save format='miniclip'")


def miniclip_config_to_dual_encoder(config: ClipConfig, vision_width: int) -> dict:
    """ClipConfig -> config.json content `VisionTextDualEncoderModel.from_pretrained` reads."""
    from transformers import TimmWrapperConfig, VisionTextDualEncoderConfig
    from miniclip.towers import hf_text_config
    check_exportable(config)
    v = config.vision_cfg
    # hidden_size: what the dual encoder sizes visual_projection by (a timm config has no such field of its own)
    model_args = {k: a for k, a in (v.timm_model_args or {}).items() if k not in ("num_classes", "global_pool")}
    vision = TimmWrapperConfig(architecture=v.timm_model_name, model_args=model_args or None, hidden_size=vision_width,
                               pretrained_cfg={"input_size": [3, v.image_size, v.image_size],
                                               "mean": list(config.preprocess_cfg.mean),
                                               "std": list(config.preprocess_cfg.std)})
    out = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, hf_text_config(config), projection_dim=config.embed_dim,
        logit_scale_init_value=config.init_logit_scale).to_dict()
    out["architectures"] = [MODEL_CLASS]
    return out


def save_dual_encoder(state: dict, config: ClipConfig, output_dir: Path) -> None:
    """A folder `VisionTextDualEncoderModel.from_pretrained` loads (config + weights; the caller adds the tokenizer)."""
    check_exportable(config)
    width = state["image_encoder.visual.head.proj.weight"].shape[1]
    save_safetensors(miniclip_to_dual_encoder(state), output_dir / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(output_dir / "config.json", miniclip_config_to_dual_encoder(config, width))


def convert(state: dict, file: Path, config=None, hf_config: dict | None = None):
    """The layout record's converter: a dual encoder state dict (+ its config.json content) -> (MiniClip state dict,
    MiniClip name -> file name, the config it describes or None)."""
    renamed, origin = dual_encoder_to_miniclip(state)
    if hf_config is None:
        if config is None:
            raise CheckpointError(f"{file} looks like a {MODEL_CLASS} state dict without its config.json. Fix: load "
                                  "the folder holding config.json, or pass config=<model config>.")
        return renamed, origin, None
    stored = dual_encoder_config_to_miniclip(hf_config, file.parent, str(file.parent / "config.json"))
    return renamed, origin, stored
