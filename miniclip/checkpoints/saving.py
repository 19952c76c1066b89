"""Writing a `MiniClip` out: a miniclip folder (what `load_pretrained` and the Trainer read back), a Hugging Face
`CLIPModel` / `ChineseCLIPModel` folder, an open_clip hub folder, or ONNX graphs of the two towers (serving/onnx.py).
Every file is written atomically.

Leaves out on purpose: sharded weight files and pushing to a hub (`huggingface_hub.upload_folder` does that).
"""
from __future__ import annotations

import logging
from pathlib import Path

from miniclip.checkpoints import chinese_clip, dual_encoder, hf_clip
from miniclip.checkpoints.layouts import (CONFIG_FILE, HF_CONFIG, HF_WEIGHTS, MODEL_FILE, OPEN_CLIP_CONFIG,
                                          TOKENIZER_FILE, ExportFormat, miniclip_to_open_clip)
from miniclip.config import ClipConfig, check_literal
from miniclip.files import atomic_write_json, atomic_write_text, save_safetensors
from miniclip.serving.onnx import VARIANTS, export_onnx
from miniclip.tokenizer import HF_TOKENIZER_DIR, VOCAB_FILENAME, BertWordPieceTokenizer, HFTokenizer, get_tokenizer
from miniclip.towers import self_contained_config

logger = logging.getLogger(__name__)


def save_pretrained(model, output_dir: str | Path, format: str = "miniclip", tokenizer=None,
                    onnx_variants=VARIANTS) -> Path:
    """Write `model` as a miniclip folder (model.safetensors + model_config.json + tokenizer_config.json
    [+ vocab.txt]), a Hugging Face CLIPModel / ChineseCLIPModel folder ("hf"), an open_clip hub folder
    ("open_clip") or ONNX graphs ("onnx": `onnx_variants` of fp32 / fp16 / int8, see serving.onnx.export_onnx,
    plus the tokenizer files). Every file is written atomically."""
    check_literal(format, ExportFormat, "format")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _drop_stale_markers(output_dir, format)
    state = {k: v for k, v in model.state_dict().items()}
    config: ClipConfig = model.config
    if format == "miniclip":
        save_safetensors(state, output_dir / MODEL_FILE, metadata={"format": "pt", "layout": "miniclip"})
        atomic_write_json(output_dir / CONFIG_FILE, self_contained_config(config).to_dict())
        _save_tokenizer(model, tokenizer, output_dir, describe=True)
    elif format == "onnx":
        export_onnx(model, output_dir, variants=onnx_variants, tokenizer=tokenizer)
        _save_tokenizer(model, tokenizer, output_dir, describe=True)
    elif format == "hf" and (config.vision_cfg.is_timm or config.text_cfg.tower == "hf"):
        dual_encoder.save_dual_encoder(state, self_contained_config(config), output_dir)
        _save_tokenizer(model, tokenizer, output_dir, describe=False)
    elif format == "hf":
        _save_hf(state, config, output_dir)
        _save_tokenizer(model, tokenizer, output_dir, describe=False)
    else:
        _save_open_clip(state, config, output_dir)
    return output_dir


def _drop_stale_markers(output_dir: Path, format: str) -> None:
    """A folder is read as the first layout whose config file it holds (layouts.FOLDER_ORDER: miniclip, then
    open_clip, ...): a marker an earlier save left there would shadow what is written now, so it goes first."""
    stale = [] if format == "miniclip" else [CONFIG_FILE]
    if format not in ("miniclip", "open_clip"):
        stale.append(OPEN_CLIP_CONFIG)
    for name in stale:
        (output_dir / name).unlink(missing_ok=True)


def _save_tokenizer(model, tokenizer, output_dir: Path, describe: bool) -> None:
    if tokenizer is None:
        try:
            tokenizer = get_tokenizer(model.config, checkpoint_dir=model.checkpoint_dir)
        except FileNotFoundError as e:
            logger.warning("no tokenizer saved with the model: %s", e)
            return
    if describe:
        atomic_write_json(output_dir / TOKENIZER_FILE, tokenizer.describe())
    if isinstance(tokenizer, HFTokenizer):  # its own files: in text_tower/ (miniclip), on top (transformers' folder)
        tokenizer.save(output_dir / HF_TOKENIZER_DIR if describe else output_dir)
    if isinstance(tokenizer, BertWordPieceTokenizer):
        source, target = Path(tokenizer.vocab_file), output_dir / VOCAB_FILENAME
        if not target.exists() or source.resolve() != target.resolve():
            atomic_write_text(target, source.read_text(encoding="utf-8"))


def _save_hf(state: dict, config: ClipConfig, output_dir: Path) -> None:
    if config.text_cfg.tower == "bert":
        hf_state = chinese_clip.miniclip_to_hf_chinese_clip(state, config)
        hf_config = chinese_clip.miniclip_config_to_hf_chinese_clip(config)
    else:
        hf_state, hf_config = hf_clip.miniclip_to_hf_clip(state, config), hf_clip.miniclip_config_to_hf_clip(config)
    save_safetensors(hf_state, output_dir / HF_WEIGHTS[0], metadata={"format": "pt"})
    atomic_write_json(output_dir / HF_CONFIG, hf_config)


def _save_open_clip(state: dict, config: ClipConfig, output_dir: Path) -> None:
    if config.vision_cfg.is_timm or config.text_cfg.tower == "hf":
        raise ValueError("format='open_clip' is not written for timm / transformers towers; use format='hf' "
                         "(VisionTextDualEncoderModel) or 'miniclip'")
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
    atomic_write_json(output_dir / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
