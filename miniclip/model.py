"""MiniClip, the CLIP model: an image encoder, a text encoder and a learnable temperature, wired from a `ClipConfig`.

The towers are open_clip's own modules (ViT, ModifiedResNet, causal text transformer, and TimmModel / HFTextEncoder
for any timm / transformers model: towers.py) and transformers' BertModel (Chinese-CLIP); this file only wires them
together. Leaves out on purpose: the loss (loss.py), reading and writing
checkpoints (checkpoints/), and training-time choices such as locking schedules (training/).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import PatchDropout, lock_text_tower
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import ModelOutput

from miniclip.config import ClipConfig, load_model_config
from miniclip.attention import use_fast_attention
from miniclip.towers import build_hf_text_tower, build_timm_tower, encode_hf_text, lock_hf_text_tower


@dataclass
class ClipOutput(ModelOutput):
    """What `MiniClip.forward` returns. Embeddings are L2-normalised; `logit_scale` is the multiplier exp(t)."""
    image_embeds: torch.Tensor | None = None  # (B, D)
    text_embeds: torch.Tensor | None = None  # (B, D)
    logit_scale: torch.Tensor | None = None  # () scalar, exp of the learnt log-temperature
    logit_bias: torch.Tensor | None = None  # () scalar, only with a sigmoid loss


class _ScalarParameter(nn.Module):
    """One learnt scalar stored as a (1,) tensor, because PyTorch's FSDP2 (`fully_shard`, the Trainer's default
    --fsdp) refuses 0-d parameters; state dicts keep the checkpoints' 0-d shape (open_clip / OpenAI / HF), so every
    published file loads and saves as before."""
    name: str

    def __init__(self, init_value: float):
        super().__init__()
        setattr(self, self.name, nn.Parameter(torch.tensor([float(init_value)])))  # (1,)
        self.register_state_dict_post_hook(_squeeze_scalar)
        self.register_load_state_dict_pre_hook(_unsqueeze_scalar)

    @property
    def value(self) -> torch.Tensor:  # () view of the parameter, with autograd
        return getattr(self, self.name).reshape(())


def _squeeze_scalar(module, state_dict, prefix, local_metadata):
    key = prefix + module.name
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor and value.shape == (1,):
        state_dict[key] = value.reshape(())  # a sharded (DTensor) state dict keeps its (1,) shape


def _unsqueeze_scalar(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    key = prefix + module.name
    if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


def scalar_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the learnt scalars (logit scale / bias), which checkpoints store 0-d."""
    return [f"{name}.{module.name}" if name else module.name for name, module in model.named_modules()
            if isinstance(module, _ScalarParameter)]


class LogitScale(_ScalarParameter):
    """Holds the log of CLIP's inverse temperature (CLIP paper, sec. 2.5); `forward()` returns the multiplier ()."""
    name = "logit_scale"

    def forward(self) -> torch.Tensor:
        return self.value.exp()


class LogitBias(_ScalarParameter):
    """The learnt bias of the sigmoid loss (SigLIP, Zhai et al. 2023); `forward()` returns it as a () tensor."""
    name = "logit_bias"

    def forward(self) -> torch.Tensor:
        # A reshaped copy, not the Parameter itself: DistributedDataParallel finds used parameters by walking back
        # from the outputs' grad_fn, and a bare Parameter output (no grad_fn) would be taken for unused, then fail as
        # "marked ready twice" in backward.
        return self.value.clone()


class ImageEncoder(nn.Module):
    """open_clip's VisionTransformer or ModifiedResNet under `.visual`, the key prefix of every CLIP checkpoint."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        if config.vision_cfg.is_timm:
            self.visual = build_timm_tower(config)
            return
        cfg = config.open_clip_cfg()["vision_cfg"]
        self.visual = _build_vision_tower(config.embed_dim, cfg, quick_gelu=config.quick_gelu)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        return self.visual(pixel_values)


def build_text_transformer(config: ClipConfig) -> nn.Module:
    """open_clip's causal TextTransformer: token + position embeddings, pre-LN blocks, EOT (argmax id) pooling."""
    cfg = config.open_clip_cfg()["text_cfg"]
    return _build_text_tower(config.embed_dim, cfg, quick_gelu=config.quick_gelu)


class BertTextEncoder(nn.Module):
    """Chinese-CLIP's text tower: a BERT encoder; the text feature is the [CLS] state @ text_projection."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        t = config.text_cfg
        bert_config = BertConfig(
            vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
            intermediate_size=t.intermediate_size, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
            max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size, pad_token_id=0)
        self.bert = BertModel(bert_config, add_pooling_layer=False)  # Chinese-CLIP never uses the pooler
        self.text_projection = nn.Parameter(torch.randn(t.width, config.embed_dim) * t.width ** -0.5)
        self.context_length = t.context_length
        self.pad_id = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = input_ids.ne(self.pad_id).long()  # (B, L)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, W)
        return hidden[:, 0] @ self.text_projection  # (B, D)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        for p in self.parameters():
            p.requires_grad = False
        if unlocked_layers:
            for layer in self.bert.encoder.layer[-unlocked_layers:]:
                layer.requires_grad_(True)
            self.text_projection.requires_grad = True

    def set_grad_checkpointing(self, enable: bool = True):
        if enable:  # transformers 5 renamed gradient_ to activation_checkpointing_enable
            (getattr(self.bert, "activation_checkpointing_enable", None) or self.bert.gradient_checkpointing_enable)(
                {"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_disable()


class MiniClip(nn.Module):
    """CLIP (Radford et al. 2021): `encode_image` (B, 3, S, S) -> (B, D), `encode_text` (B, L) -> (B, D), and
    `forward` returning both L2-normalised with the logit scale, which a loss from loss.py turns into a number.

    Parameter names keep the tutorial's layout (`image_encoder.visual.*`, `text_encoder.*`,
    `logit_scale.logit_scale`), so its checkpoints load as they are. `load_info` is None for a model built here and
    a `checkpoints.LoadResult` (file, layout, ignored keys) for one made by `from_pretrained`. Leaves out on purpose:
    preprocessing (transforms.py / tokenizer.py turn images and captions into tensors) and any loss.
    """

    # The units FSDP shards and gathers one at a time (read by accelerate's transformer_based_wrap policy, as for
    # transformers models; names this model does not contain are passed over). The ViT / text blocks are
    # FastResidualAttentionBlock after use_fast_attention: a policy naming open_clip's ResidualAttentionBlock would
    # find none of them.
    _no_split_modules = ["FastResidualAttentionBlock", "ResidualAttentionBlock", "BertLayer", "Bottleneck"]

    def __init__(self, config: ClipConfig | str | dict):
        super().__init__()
        self.config = config = load_model_config(config)
        self.load_info = None  # set by checkpoints.load_pretrained: what was read, and from where
        self.image_encoder = ImageEncoder(config)
        if config.text_cfg.tower == "bert":
            self.text_encoder = BertTextEncoder(config)
        elif config.text_cfg.tower == "hf":
            self.text_encoder = build_hf_text_tower(config)
        else:
            self.text_encoder = build_text_transformer(config)
        self.logit_scale = LogitScale(config.init_logit_scale)
        self.logit_bias = LogitBias(config.init_logit_bias) if config.init_logit_bias is not None else None
        # Same weights and math as open_clip's blocks, attention computed batch-first (attention.py).
        use_fast_attention(self)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        image_embeds = self.image_encoder(pixel_values)  # (B, D)
        return F.normalize(image_embeds, dim=-1) if normalize else image_embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        if isinstance(self.text_encoder, BertTextEncoder):
            text_embeds = self.text_encoder(input_ids, attention_mask)
        elif self.config.text_cfg.tower == "hf":
            text_embeds = encode_hf_text(self.text_encoder, input_ids, attention_mask)
        else:
            text_embeds = self._encode_causal_text(input_ids)
        return F.normalize(text_embeds, dim=-1) if normalize else text_embeds  # (B, D)

    def _encode_causal_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's text tower, run over however many positions `input_ids` has (<= context_length).

        Causal attention lets a token see only earlier ones, and the feature is read at the EOT token (the highest
        id), so padding columns after the batch's last EOT change nothing: callers may trim them (data.py does),
        which saves most of the text compute for short captions. No padding mask is needed for the same reason.
        """
        tower, length = self.text_encoder, input_ids.shape[1]
        x = tower.token_embedding(input_ids) + tower.positional_embedding[:length]  # (B, L, W)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]  # (B, W) at EOT
        return x @ tower.text_projection  # (B, D)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **unused) -> ClipOutput:
        return ClipOutput(
            image_embeds=self.encode_image(pixel_values, normalize=True) if pixel_values is not None else None,
            text_embeds=self.encode_text(input_ids, attention_mask, normalize=True) if input_ids is not None else None,
            logit_scale=self.logit_scale(),
            logit_bias=self.logit_bias() if self.logit_bias is not None else None,
        )

    # --- locking (LiT, Zhai et al. 2022) and memory ---------------------------------------------------------------
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True):
        self.image_encoder.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def unlock_image_tower(self):
        self.image_encoder.requires_grad_(True)

    def lock_text_tower(self, unlocked_layers: int = 0):
        if isinstance(self.text_encoder, BertTextEncoder):
            self.text_encoder.lock(unlocked_layers)
        elif self.config.text_cfg.tower == "hf":
            lock_hf_text_tower(self.text_encoder, unlocked_layers)
        else:
            lock_text_tower(self.text_encoder, unlocked_layers)

    def set_patch_dropout(self, prob: float) -> None:
        """FLIP patch dropout (Li et al., CVPR 2023) on the ViT image tower: in training, keep a random
        int(N * (1 - prob)) of the N patch tokens (class token always kept), through open_clip's own `PatchDropout`;
        evaluation sees every patch. 0 switches it off. Recorded in the config, so saved models keep the setting."""
        if (self.config.vision_cfg.is_resnet or self.config.vision_cfg.is_timm) and prob:
            raise ValueError("patch dropout needs an open_clip ViT image tower (patch tokens); this model's is a "
                             f"{'timm model' if self.config.vision_cfg.is_timm else 'ResNet'}")
        self.config.vision_cfg.patch_dropout = float(prob)
        self.config.vision_cfg.__post_init__()  # range check
        if not (self.config.vision_cfg.is_resnet or self.config.vision_cfg.is_timm):
            self.image_encoder.visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False):
        """Called by the HF Trainer when `--gradient_checkpointing` is set: transformer blocks recompute their
        activations in backward. A tower without it is refused by name; a trainable ModifiedResNet too: open_clip
        gives it none (its set_grad_checkpointing does nothing), and recomputing BatchNorm in train mode would
        update the running statistics twice per step."""
        if every_n_layers != 1 or offload:
            raise ValueError("gradient_checkpointing: MiniClip recomputes every block, on the device; every_n_layers "
                             f"={every_n_layers} / offload={offload} are not supported. Fix: leave them unset.")
        visual = self.image_encoder.visual
        if isinstance(visual, ModifiedResNet) and any(p.requires_grad for p in visual.parameters()):
            raise ValueError(
                "gradient_checkpointing: the image tower (open_clip ModifiedResNet) has no gradient checkpointing; "
                "recomputing its BatchNorm layers would count their running statistics twice. Fix: train without "
                "--gradient_checkpointing, or lock the image tower (--lock_image), which then saves no activations.")
        try:  # a timm trunk directly: open_clip's TimmModel would only log a warning when the model cannot
            (visual.trunk if self.config.vision_cfg.is_timm else visual).set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise ValueError(f"gradient checkpointing is not supported by the image tower "
                             f"{self.config.vision_cfg.timm_model_name or type(visual).__name__}: {e!r}") from None
        if self.config.text_cfg.tower == "hf":
            text = self.text_encoder.transformer  # transformers 5 renamed gradient_ to activation_checkpointing_enable
            (getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable)(
                {"use_reentrant": False})
        else:
            self.text_encoder.set_grad_checkpointing(True)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """The older name of activation_checkpointing_enable (transformers < 5 calls this one)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def checkpoint_dir(self):
        """The folder this model was loaded from (its tokenizer files live there), or None."""
        return self.load_info.directory if self.load_info is not None else None

    # --- checkpoints: checkpoints/ does the work. The package's one import cycle: checkpoints/ builds MiniClip, and
    # these two convenience methods import it lazily, so `MiniClip.from_pretrained` works without a second import.
    @classmethod
    def from_pretrained(cls, name_or_path, config=None, format: str = "auto", **kwargs) -> "MiniClip":
        """A checkpoint file / folder / known name in any supported layout; see `checkpoints.loading.load_pretrained`."""
        from miniclip.checkpoints.loading import load_pretrained  # the documented cycle
        return load_pretrained(name_or_path, config=config, format=format, **kwargs)

    def save_pretrained(self, output_dir, format: str = "miniclip", tokenizer=None):
        """Write this model as a miniclip / Hugging Face ("hf") / open_clip / "onnx" folder; see
        `checkpoints.saving.save_pretrained`."""
        from miniclip.checkpoints.saving import save_pretrained  # the documented cycle
        return save_pretrained(self, output_dir, format=format, tokenizer=tokenizer)
