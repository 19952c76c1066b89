"""Typed model configuration: `model_configs/<name>.json` (open_clip's embed_dim / vision_cfg / text_cfg shape)
-> frozen-by-convention dataclasses that reject unknown keys and check invariants.

Leaves out on purpose: timm / HF-hub towers, attentional poolers and the other open_clip research options;
a config here describes exactly the towers `MiniClip` can build.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
# Installed without the repository (pip install .): configs are looked up here as well.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

TextTower = Literal["transformer", "bert"]
ResizeMode = Literal["shortest", "squash"]


def check_literal(value: Any, literal: Any, what: str) -> None:
    options = get_args(literal)
    if value not in options:
        raise ValueError(f"{what}={value!r} is not one of {list(options)}")


def _from_dict(cls, data: dict, where: str):
    """Build dataclass `cls` from `data`, refusing keys it does not declare (typos must not pass silently)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    return cls(**data)


@dataclass
class VisionConfig:
    """Image tower: a ViT when `layers` is an int, open_clip's ModifiedResNet when it is a list of 4 stage depths."""
    image_size: int = 224
    layers: int | list[int] = 12
    width: int = 768
    patch_size: int | None = 16
    head_width: int = 64
    mlp_ratio: float = 4.0
    # FLIP (Li et al., CVPR 2023): fraction of patch tokens dropped at random in training (class token kept; open_clip's
    # PatchDropout). ViT only; evaluation always sees every patch.
    patch_dropout: float = 0.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, list)

    @property
    def heads(self) -> int:
        # open_clip's convention: the ResNet's attention pool works on width * 32 channels.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width

    def __post_init__(self):
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision_cfg.patch_dropout={self.patch_dropout} must be in [0, 1) (0 = off)")
        if self.is_resnet and self.patch_dropout:
            raise ValueError("vision_cfg.patch_dropout needs a ViT image tower (patch tokens); this one is a ResNet")
        if self.is_resnet:
            if len(self.layers) != 4 or not all(isinstance(n, int) and n > 0 for n in self.layers):
                raise ValueError(f"vision_cfg.layers={self.layers}: a ResNet needs 4 positive stage depths, e.g. [3, 4, 6, 3]")
            if self.image_size % 32:
                raise ValueError(f"vision_cfg.image_size={self.image_size} must be a multiple of 32 for a ResNet (5 stride-2 stages)")
            if (self.width * 32) % self.head_width:
                raise ValueError(f"vision_cfg: width*32={self.width * 32} is not divisible by head_width={self.head_width}")
            return
        if not isinstance(self.layers, int) or self.layers <= 0:
            raise ValueError(f"vision_cfg.layers={self.layers!r} must be a positive int (ViT) or a list of 4 ints (ResNet)")
        if not self.patch_size:
            raise ValueError("vision_cfg.patch_size is required for a ViT (layers is an int)")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_cfg: image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.width % self.head_width:
            raise ValueError(f"vision_cfg: width={self.width} is not divisible by head_width={self.head_width}")


@dataclass
class TextConfig:
    """Text tower: open_clip's causal transformer (CLIP BPE, EOT pooling) or a BERT encoder ([CLS] pooling)."""
    tower: TextTower = "transformer"
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # BERT-only fields (Chinese-CLIP); ignored by the transformer tower.
    intermediate_size: int | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        check_literal(self.tower, TextTower, "text_cfg.tower")
        if self.width % self.heads:
            raise ValueError(f"text_cfg: width={self.width} is not divisible by heads={self.heads}")
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"text_cfg.{name}={getattr(self, name)} must be positive")
        if self.tower == "bert":
            if self.intermediate_size is None:
                self.intermediate_size = int(self.width * self.mlp_ratio)
            if self.context_length > self.max_position_embeddings:
                raise ValueError(f"text_cfg: context_length={self.context_length} exceeds "
                                 f"max_position_embeddings={self.max_position_embeddings}")


@dataclass
class PreprocessConfig:
    """How images become `pixel_values`: open_clip/OpenAI resize the shorter side then crop; Chinese-CLIP squashes."""
    resize_mode: ResizeMode = "shortest"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        check_literal(self.resize_mode, ResizeMode, "preprocess_cfg.resize_mode")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocess_cfg: mean/std need 3 values each and std > 0, got {self.mean} / {self.std}")


@dataclass
class ClipConfig:
    embed_dim: int
    vision_cfg: VisionConfig
    text_cfg: TextConfig
    quick_gelu: bool = False  # OpenAI and Chinese-CLIP towers use QuickGELU; TinyCLIP and LAION open_clip use GELU
    preprocess_cfg: PreprocessConfig = field(default_factory=PreprocessConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP paper, section 2.5
    init_logit_bias: float | None = None  # set for the sigmoid loss (SigLIP uses -10)
    name: str | None = None  # where the config came from; informational

    def __post_init__(self):
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim={self.embed_dim} must be positive")

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "ClipConfig":
        data = dict(data)
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in data]
        if missing:
            raise ValueError(f"{where} is missing required key(s) {missing}")
        data["vision_cfg"] = _from_dict(VisionConfig, data["vision_cfg"], f"{where}: vision_cfg")
        data["text_cfg"] = _from_dict(TextConfig, data["text_cfg"], f"{where}: text_cfg")
        data["preprocess_cfg"] = _from_dict(PreprocessConfig, data.get("preprocess_cfg", {}), f"{where}: preprocess_cfg")
        return _from_dict(cls, data, where)

    def open_clip_cfg(self) -> dict:
        """This config in open_clip's own model-config shape (`open_clip.model.CLIP(**cfg)`); transformer text only."""
        v, t = self.vision_cfg, self.text_cfg
        vision = dict(image_size=v.image_size, layers=v.layers, width=v.width, head_width=v.head_width,
                      mlp_ratio=v.mlp_ratio, patch_size=v.patch_size or 16)
        if v.patch_dropout:  # open_clip builds its PatchDropout from this key (left out at 0: the published shape)
            vision["patch_dropout"] = v.patch_dropout
        text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                    layers=t.layers, mlp_ratio=t.mlp_ratio)
        return dict(embed_dim=self.embed_dim, quick_gelu=self.quick_gelu, vision_cfg=vision, text_cfg=text)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["preprocess_cfg"]["mean"] = list(self.preprocess_cfg.mean)
        out["preprocess_cfg"]["std"] = list(self.preprocess_cfg.std)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _config_dirs() -> list[Path]:
    return [d for d in (CONFIG_DIR, PACKAGE_CONFIG_DIR) if d.is_dir()]


def list_model_configs() -> list[str]:
    """Names accepted by `load_model_config` (file stems under model_configs/)."""
    return sorted({p.stem for d in _config_dirs() for p in d.glob("*.json")})


def load_model_config(name_or_path: str | Path | dict | ClipConfig) -> ClipConfig:
    """A config name (see `list_model_configs()`), a path to a JSON file, a dict, or a ClipConfig."""
    if isinstance(name_or_path, ClipConfig):
        return name_or_path
    if isinstance(name_or_path, dict):
        return ClipConfig.from_dict(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [d / f"{name_or_path}.json" for d in _config_dirs()]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ValueError(f"unknown model config {str(name_or_path)!r}: not a JSON file and not a known name. "
                             f"Available model configs: {', '.join(list_model_configs())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None
    config = ClipConfig.from_dict(data, where=str(path))
    if config.name is None:
        config.name = path.stem
    return config
