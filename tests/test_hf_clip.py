"""transformers.CLIPModel <-> MiniClip: real HF models with random weights, saved and read back as real files."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from miniclip.config import load_model_config, list_model_configs
from miniclip.checkpoints.hf_clip import (hf_clip_config_to_miniclip, hf_clip_to_miniclip, miniclip_config_to_hf_clip,
                                 miniclip_to_hf_clip)
from miniclip.model import MiniClip


def tiny_config(quick_gelu=False):
    return dataclasses.replace(load_model_config("tiny-vit"), quick_gelu=quick_gelu, name=None)


def perturb_(model, seed=0):
    """Random offsets on every parameter (biases and LayerNorms too, which init leaves at 0 / 1), so that a
    wrong bias or LayerNorm mapping shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def clip_inputs(config, batch=3, seed=1):
    """Random images; captions = [BOS] tokens... [EOT] then zero padding, EOT = vocab_size - 1 (CLIP's BPE)."""
    g = torch.Generator().manual_seed(seed)
    size, t = config.vision_cfg.image_size, config.text_cfg
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, n in enumerate(torch.randint(3, t.context_length, (batch,), generator=g).tolist()):
        input_ids[i, :n] = torch.randint(1, t.vocab_size - 2, (n,), generator=g)
        input_ids[i, 0], input_ids[i, n - 1] = t.vocab_size - 2, t.vocab_size - 1
        attention_mask[i, :n] = 1
    return pixel_values, input_ids, attention_mask


def features(output):
    """get_*_features returns a tensor in older transformers, a BaseModelOutputWithPooling in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def assert_same_embeddings(hf_model, model, config):
    pixel_values, input_ids, attention_mask = clip_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values),
                                   features(hf_model.get_image_features(pixel_values=pixel_values)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.encode_text(input_ids),
            features(hf_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)),
            atol=1e-5, rtol=0)


def hf_folder(tmp_path, config, legacy_bin=False, **text_overrides):
    """A CLIPModel folder as transformers writes it; `legacy_bin` rewrites the weights the way transformers < 4.31
    saved them: pytorch_model.bin with the persistent `position_ids` buffers."""
    hf_config = miniclip_config_to_hf_clip(config)
    hf_config["text_config"].update(text_overrides)
    torch.manual_seed(0)
    hf_model = perturb_(CLIPModel(CLIPConfig(**hf_config)))
    hf_model.save_pretrained(tmp_path)
    if legacy_bin:
        state = load_file(tmp_path / "model.safetensors")
        for tower in ("text_model", "vision_model"):
            state[f"{tower}.embeddings.position_ids"] = getattr(hf_model, tower).embeddings.position_ids.clone()
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    return hf_model


def read_hf_folder(path):
    hf_config = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors"), hf_config
    return torch.load(path / "pytorch_model.bin", weights_only=True), hf_config


@pytest.mark.parametrize("legacy_bin", [False, True], ids=["safetensors", "legacy-bin"])
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_hf_clip_folder_loads_into_miniclip(tmp_path, legacy_bin, quick_gelu):
    config = tiny_config(quick_gelu)
    hf_model = hf_folder(tmp_path, config, legacy_bin=legacy_bin)
    state, hf_config = read_hf_folder(tmp_path)
    assert hf_config["model_type"] == "clip"
    inferred = hf_clip_config_to_miniclip(hf_config)
    assert inferred.to_dict() == config.to_dict()
    converted, ignored = hf_clip_to_miniclip(state, hf_config)
    expected_ignored = ["vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"]
    assert ignored == (expected_ignored if legacy_bin else [])
    model = MiniClip(inferred).eval()
    model.load_state_dict(converted, strict=True)
    assert_same_embeddings(hf_model, model, config)
    # MiniClip holds the scalar as a (1,) tensor (FSDP2 shards no 0-d parameter); its state dict has HF's 0-d shape
    torch.testing.assert_close(model.state_dict()["logit_scale.logit_scale"], hf_model.logit_scale, atol=0, rtol=0)


def test_legacy_eos_token_id_2_pools_at_highest_id(tmp_path):
    """Configs written before transformers PR #24773 say eos_token_id=2; HF then pools at argmax like MiniClip."""
    config = tiny_config()
    hf_model = hf_folder(tmp_path, config, eos_token_id=2)
    state, hf_config = read_hf_folder(tmp_path)
    model = MiniClip(hf_clip_config_to_miniclip(hf_config)).eval()
    model.load_state_dict(hf_clip_to_miniclip(state, hf_config)[0], strict=True)
    assert_same_embeddings(hf_model, model, config)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_miniclip_exports_to_clipmodel(tmp_path, quick_gelu):
    config = tiny_config(quick_gelu)
    torch.manual_seed(0)
    model = perturb_(MiniClip(config))
    state = model.state_dict()
    hf_state = miniclip_to_hf_clip(state, config)
    save_file(hf_state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(miniclip_config_to_hf_clip(config)))
    hf_model, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    strict = CLIPModel(hf_model.config).load_state_dict(hf_state, strict=True)  # raises on any mismatch
    assert not strict.missing_keys and not strict.unexpected_keys
    assert_same_embeddings(hf_model.eval(), model, config)
    back, ignored = hf_clip_to_miniclip(hf_state, miniclip_config_to_hf_clip(config))
    assert ignored == [] and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


@pytest.mark.parametrize("name", [n for n in list_model_configs()
                                  if not load_model_config(n).vision_cfg.is_resnet
                                  and load_model_config(n).text_cfg.tower == "transformer"])
def test_config_round_trip(name):
    config = dataclasses.replace(load_model_config(name), name=None)
    hf_config = miniclip_config_to_hf_clip(config)
    parsed = CLIPConfig(**hf_config)  # transformers accepts it as it is
    assert parsed.vision_config.num_attention_heads * config.vision_cfg.head_width == config.vision_cfg.width
    assert hf_clip_config_to_miniclip(json.loads(json.dumps(hf_config))).to_dict() == config.to_dict()


def test_openai_style_config_json():
    """The shape of openai/clip-vit-base-patch32's config.json (values from that file; keys HF fills are left out)."""
    hf_config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
                 "logit_scale_init_value": 2.6592, "text_config": {"bos_token_id": 0, "eos_token_id": 2},
                 "vision_config": {"patch_size": 32}}
    config = hf_clip_config_to_miniclip(hf_config)
    expected = load_model_config("OpenAI-ViT-B-32")
    assert config.vision_cfg == expected.vision_cfg and config.text_cfg == expected.text_cfg
    assert config.quick_gelu and config.embed_dim == 512


def test_unknown_and_incomplete_keys_pass_through():
    config = tiny_config()
    state = miniclip_to_hf_clip(MiniClip(config).state_dict(), config)
    state["text_model.extra.weight"] = torch.zeros(1)
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    converted, _ = hf_clip_to_miniclip(state, {"model_type": "clip"})
    assert "text_model.extra.weight" in converted
    assert "vision_model.encoder.layers.1.self_attn.q_proj.weight" in converted
    assert "image_encoder.visual.transformer.resblocks.1.attn.in_proj_weight" not in converted
    with pytest.raises(RuntimeError, match="Missing key.*in_proj_weight"):
        MiniClip(config).load_state_dict(converted, strict=True)


def _config_error(**changes):
    hf_config = miniclip_config_to_hf_clip(tiny_config())
    for key, value in changes.items():
        tower, field = key.split("__")
        hf_config[tower][field] = value
    return hf_clip_config_to_miniclip(hf_config)


@pytest.mark.parametrize("changes, message", [
    ({"text_config__hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"vision_config__hidden_act": "quick_gelu"}, "different activations"),
    ({"vision_config__layer_norm_eps": 1e-6}, "layer_norm_eps=1e-06"),
    ({"text_config__eos_token_id": 7}, "eos_token_id=7"),
    ({"vision_config__num_channels": 1}, "num_channels=1"),
])
def test_bad_hf_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        _config_error(**changes)


def test_wrong_model_type_and_unexportable_models_are_refused():
    with pytest.raises(ValueError, match="model_type='chinese_clip'.*chinese_clip"):
        hf_clip_to_miniclip({}, {"model_type": "chinese_clip"})
    resnet = load_model_config("tiny-resnet")
    with pytest.raises(ValueError, match="no ResNet image tower"):
        miniclip_config_to_hf_clip(resnet)
    with pytest.raises(ValueError, match="no ResNet image tower"):
        miniclip_to_hf_clip(MiniClip(resnet).state_dict(), resnet)
    with pytest.raises(ValueError, match="text_cfg.tower='transformer'"):
        miniclip_config_to_hf_clip(load_model_config("tiny-chinese-vit"))
    sigmoid = dataclasses.replace(tiny_config(), init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        miniclip_to_hf_clip(MiniClip(sigmoid).state_dict(), sigmoid)


# --- through the loader core (checkpoints.py): detection, strict validation, export -----------------------------

@pytest.mark.parametrize("legacy_bin", [False, True], ids=["safetensors", "legacy-bin"])
@pytest.mark.parametrize("with_config", [False, True], ids=["config=None", "config=given"])
def test_load_pretrained_reads_hf_clip_folder(tmp_path, legacy_bin, with_config):
    from miniclip.checkpoints import load_pretrained
    config = tiny_config(quick_gelu=True)
    hf_model = hf_folder(tmp_path, config, legacy_bin=legacy_bin)
    model = load_pretrained(tmp_path, config=config if with_config else None)
    assert model.load_info.layout == "hf_clip"
    assert model.load_info.ignored == (["text_model.embeddings.position_ids",
                                           "vision_model.embeddings.position_ids"] if legacy_bin else [])
    assert model.config.quick_gelu
    assert_same_embeddings(hf_model, model, config)


def test_save_pretrained_hf_is_a_clipmodel_folder(tmp_path):
    from miniclip.checkpoints import load_pretrained, save_pretrained
    config = tiny_config()
    torch.manual_seed(0)
    model = perturb_(MiniClip(config))
    save_pretrained(model, tmp_path, format="hf")
    hf_model, info = CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same_embeddings(hf_model.eval(), model, config)
    back = load_pretrained(tmp_path)
    assert back.config.to_dict() == config.to_dict()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_old_config_dict_keys_are_read():
    """config.json files from transformers < 4.21 carry the tower settings as `text_config_dict` /
    `vision_config_dict`; transformers still reads them, and so do we (through CLIPConfig)."""
    hf_config = {"model_type": "clip", "projection_dim": 256, "text_config": None, "vision_config": None,
                 "text_config_dict": {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024,
                                      "eos_token_id": 49407},
                 "vision_config_dict": {"hidden_size": 384, "num_attention_heads": 6, "patch_size": 16,
                                        "intermediate_size": 1536, "hidden_act": "quick_gelu"}}
    config = hf_clip_config_to_miniclip(hf_config)
    assert (config.text_cfg.width, config.text_cfg.heads, config.embed_dim) == (256, 4, 256)
    assert (config.vision_cfg.width, config.vision_cfg.head_width, config.vision_cfg.patch_size) == (384, 64, 16)
