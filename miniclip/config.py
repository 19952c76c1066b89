"""Typed model configuration: `model_configs/<name>.json` (open_clip's embed_dim / vision_cfg / text_cfg shape)
-> dataclasses that reject unknown keys and check invariants, and `check_literal`, the one check of a `Literal` choice.

Towers: open_clip's ViT / ModifiedResNet / causal text transformer, Chinese-CLIP's BERT, or any timm image model and
any transformers text model (open_clip's TimmModel / HFTextEncoder, option names as open_clip's). Leaves out on
purpose: attentional poolers and the other open_clip research options; a config describes exactly what `MiniClip`
can build.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from miniclip.files import read_mapping_file

# The configs ship inside the package (pip install ., wheels); the checkout's top-level model_configs/ links here.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CONFIG_DIR = PACKAGE_CONFIG_DIR

# Text lengths the published towers were trained with: CLIP's BPE (Radford et al. 2021) and Chinese-CLIP's BERT
# (Yang et al. 2022; BERT itself would allow max_position_embeddings).
CLIP_CONTEXT_LENGTH = 77
CHINESE_CLIP_CONTEXT_LENGTH = 52

TextTower = Literal["transformer", "bert", "hf"]
ResizeMode = Literal["shortest", "squash"]
# open_clip's TimmModel options: timm's global pools (or an attention pool), and the projection after the trunk.
TimmPool = Literal["", "avg", "max", "avgmax", "catavgmax", "token", "map", "abs_attn", "rot_attn"]
TimmProj = Literal["linear", "mlp", "none", ""]
# open_clip's HFTextEncoder poolers (plus the last-token pooler of causal models) and projections.
HfPooler = Literal["cls_pooler", "cls_last_hidden_state_pooler", "mean_pooler", "eot_pooler"]
HfProj = Literal["linear", "mlp"]


def check_literal(value: Any, literal: Any, what: str) -> None:
    """Raise ValueError naming `what` unless `value` is one of the options of the `Literal` type `literal`."""
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
    # A timm image tower (open_clip's TimmModel) instead of the ViT / ResNet above, with open_clip's option names.
    timm_model_name: str | None = None  # a timm name[.tag], or "local-dir:<folder>" (timm's config.json + weights)
    timm_model_args: dict | None = None  # timm constructor arguments (depth, img_size...), a config.json's model_args
    timm_model_pretrained: bool = False  # start from timm's pretrained weights for timm_model_name (hub download)
    pretrained: str | None = None  # a local timm folder (config.json + model.safetensors) to start the tower from
    timm_pool: TimmPool = "avg"  # "" keeps the model's own pooling (a ViT's class token)
    timm_proj: TimmProj = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float | None = None

    @property
    def is_timm(self) -> bool:
        return self.timm_model_name is not None
    # FLIP (Li et al., CVPR 2023): fraction of patch tokens dropped at random in training (class token kept; open_clip's
    # PatchDropout). ViT only; evaluation always sees every patch.
    patch_dropout: float = 0.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, list) and not self.is_timm

    @property
    def heads(self) -> int:
        # open_clip's convention: the ResNet's attention pool works on width * 32 channels.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width

    def __post_init__(self):
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision_cfg.patch_dropout={self.patch_dropout} must be in [0, 1) (0 = off)")
        if (self.is_resnet or self.is_timm) and self.patch_dropout:
            raise ValueError("vision_cfg.patch_dropout needs miniclip's ViT image tower (open_clip's PatchDropout); "
                             "this one is a ResNet or a timm model (for timm, pass its own options in timm_model_args)")
        if self.is_timm or self.pretrained is not None:
            return self._check_timm()
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

    def _check_timm(self):
        check_literal(self.timm_pool, TimmPool, "vision_cfg.timm_pool")
        check_literal(self.timm_proj, TimmProj, "vision_cfg.timm_proj")
        if not self.timm_model_name:
            raise ValueError("vision_cfg.pretrained is a timm tower's weights: set vision_cfg.timm_model_name too")
        if self.pretrained is not None and not (Path(self.pretrained) / "config.json").is_file():
            raise ValueError(f"vision_cfg.pretrained={self.pretrained!r}: no timm folder there ({self.pretrained}/"
                             "config.json not found). Fix: download it (huggingface-cli download timm/<name> "
                             "--local-dir <folder>) or save one with timm.models.save_for_hf(model, <folder>)")
        if self.timm_model_pretrained and (self.pretrained is not None or self.timm_model_args):
            raise ValueError("vision_cfg.timm_model_pretrained downloads timm's weights for timm_model_name alone; "
                             "with pretrained / timm_model_args, leave it false (pretrained holds the weights)")
        if self.image_size <= 0:
            raise ValueError(f"vision_cfg.image_size={self.image_size} must be positive")


@dataclass
class TextConfig:
    """Text tower: open_clip's causal transformer (CLIP BPE, EOT pooling) or a BERT encoder ([CLS] pooling)."""
    tower: TextTower = "transformer"
    context_length: int = CLIP_CONTEXT_LENGTH
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
    # A transformers text tower (open_clip's HFTextEncoder; tower "hf"), with open_clip's option names.
    hf_model_name: str | None = None  # a local folder or hub id of an encoder (BERT, RoBERTa, XLM-R, ...)
    hf_model_pretrained: bool = True  # start from its weights (False: random init, or a checkpoint fills them)
    hf_pooler_type: HfPooler = "mean_pooler"
    hf_proj_type: HfProj | None = "mlp"  # None: no projection (the model width must equal embed_dim)
    hf_config: dict | None = None  # the model's own config.json content; saved checkpoints carry it (no folder needed)

    def __post_init__(self):
        if self.hf_model_name is not None and self.tower == "transformer":
            self.tower = "hf"  # hf_model_name names the tower, as in open_clip configs
        check_literal(self.tower, TextTower, "text_cfg.tower")
        if self.tower == "hf":
            check_literal(self.hf_pooler_type, HfPooler, "text_cfg.hf_pooler_type")
            if self.hf_proj_type is not None:
                check_literal(self.hf_proj_type, HfProj, "text_cfg.hf_proj_type")
            if not self.hf_model_name:
                raise ValueError("text_cfg.tower='hf' needs text_cfg.hf_model_name (a local folder or hub id)")
            if self.context_length <= 0:
                raise ValueError(f"text_cfg.context_length={self.context_length} must be positive")
            return
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
    """A whole CLIP's architecture: the shared embedding width `embed_dim`, the two towers, the activation, how
    images are preprocessed, and the initial temperature (and bias, for the sigmoid loss). Built from
    `model_configs/<name>.json` by `load_model_config`; unknown keys are errors. Leaves out on purpose: training
    settings (training/arguments.py) and anything a checkpoint stores as weights."""
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
        data = _tower_defaults(data, where)
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


def _tower_defaults(data: dict, where: str) -> dict:
    """What a timm / transformers tower says itself when the config leaves it out: the image size and mean / std
    from the timm model's pretrained config, the context length from the text model's tokenizer."""
    vision, text = data.get("vision_cfg"), data.get("text_cfg")
    if isinstance(vision, dict) and vision.get("timm_model_name"):
        pre = dict(data.get("preprocess_cfg") or {})
        if "image_size" not in vision or not {"mean", "std"} <= set(pre):
            size, mean, std = timm_data_config(vision, where)
            data = {**data, "vision_cfg": {"image_size": size, **vision}, "preprocess_cfg": {"mean": mean, "std": std,
                                                                                            **pre}}
    if isinstance(text, dict) and text.get("hf_model_name") and "context_length" not in text:
        data = {**data, "text_cfg": {**text, "context_length": hf_context_length(text, where)}}
    return data


def timm_data_config(vision: dict, where: str = "vision_cfg") -> tuple[int, list, list]:
    """(input size, mean, std) of a timm tower: its folder's config.json (pretrained / local-dir:), else timm's
    registry (the pretrained tag's config), the size overridden by timm_model_args' img_size."""
    name, folder = vision["timm_model_name"], vision.get("pretrained")
    if name.startswith("local-dir:"):
        folder = name[len("local-dir:"):]
    if folder is not None:
        key = "pretrained" if vision.get("pretrained") else "timm_model_name"
        cfg = read_timm_folder_config(folder, f"{where}: vision_cfg.{key}")["pretrained_cfg"]
    else:
        import timm
        found = timm.models.get_pretrained_cfg(name.removeprefix("timm/"), allow_unregistered=True)
        if found is None:
            raise ValueError(f"{where}: timm_model_name={name!r} is not a timm model. Fix: a name from "
                             "timm.list_models() (optionally .tag), or local-dir:<folder>")
        cfg = found.to_dict()
    size = (vision.get("timm_model_args") or {}).get("img_size") or cfg["input_size"][-1]
    size = size[-1] if isinstance(size, (list, tuple)) else size
    return int(size), list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))


def read_timm_folder_config(folder: str | Path, where: str = "vision_cfg") -> dict:
    """A timm folder's config.json (architecture, model_args, pretrained_cfg), as timm.models.save_for_hf writes it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{where}: timm folder {folder} not found ({path} is missing). Fix: download the model "
                         "(huggingface-cli download timm/<name> --local-dir <folder>) or save one with "
                         "timm.models.save_for_hf(model, <folder>), and point the config at it")
    return json.loads(path.read_text(encoding="utf-8"))


def hf_context_length(text: dict, where: str = "text_cfg") -> int:
    """The tokenizer's model_max_length, capped by the model's max_position_embeddings."""
    from transformers import AutoConfig
    name = text["hf_model_name"]
    limit = (text.get("hf_config") or {}).get("max_position_embeddings")
    try:
        from transformers import AutoTokenizer
        tokenizer_limit = AutoTokenizer.from_pretrained(name).model_max_length
        limit = limit or getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    except OSError as e:
        raise ValueError(f"{where}: hf_model_name={name!r} cannot be loaded ({str(e).splitlines()[0]}). " +
                         HF_FIX) from None
    lengths = [n for n in (tokenizer_limit, limit) if n and n < 1_000_000]  # huge = "no limit" in transformers
    return min(lengths) if lengths else 512


HF_FIX = ("Fix: point it at a local folder holding config.json and the tokenizer files (model.save_pretrained / "
          "tokenizer.save_pretrained write them; huggingface-cli download <id> --local-dir <folder> fetches them), "
          "or a hub id with network access (HF_HUB_OFFLINE=1 needs it in the cache)")


def _config_dirs() -> list[Path]:
    return [d for d in (PACKAGE_CONFIG_DIR,) if d.is_dir()]


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
    config = ClipConfig.from_dict(read_mapping_file(path, "model config"), where=str(path))
    if config.name is None:
        config.name = path.stem
    return config
