"""Chinese-CLIP -> MiniClip: cn_clip's `.pt` layout (and its FlashAttention variant) and transformers'
ChineseCLIPModel (both directions), against the real libraries with random weights."""
import dataclasses
import json

import pytest
import torch
from cn_clip.clip.model import convert_state_dict
from safetensors.torch import load_file, save_file
from transformers import ChineseCLIPConfig, ChineseCLIPModel

from conftest import cn_clip_reference
from miniclip.config import load_model_config
from miniclip.checkpoints.chinese_clip import (cn_clip_to_miniclip, hf_chinese_clip_config_to_miniclip,
                                      hf_chinese_clip_to_miniclip, miniclip_config_to_hf_chinese_clip,
                                      miniclip_to_hf_chinese_clip)
from miniclip.model import MiniClip
from test_hf_clip import features, perturb_

CLS, SEP = 101, 102  # BERT's [CLS] / [SEP] ids in Chinese-CLIP's vocab.txt; [PAD] is 0


def bert_inputs(config, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size, t = config.vision_cfg.image_size, config.text_cfg
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    for i, n in enumerate(torch.randint(3, t.context_length, (batch,), generator=g).tolist()):
        input_ids[i, :n] = torch.randint(103, t.vocab_size, (n,), generator=g)
        input_ids[i, 0], input_ids[i, n - 1] = CLS, SEP
    return pixel_values, input_ids, input_ids.ne(0).long()


def tiny(name="tiny-chinese-vit"):
    return dataclasses.replace(load_model_config(name), name=None)


def save_like_cn_clip(reference, path, pooler=True):
    """Chinese-CLIP's training script saves {"epoch", "step", "name", "state_dict": {"module." + key}} (DDP).
    Its released files also hold `bert.pooler.*` from the RoBERTa initialisation; the installed cn_clip no longer
    builds a pooler, so it is added here with the shapes it has there."""
    state = {"module." + k: v for k, v in reference.state_dict().items()}
    if pooler:
        width = reference.bert_config.hidden_size
        state["module.bert.pooler.dense.weight"] = torch.randn(width, width)
        state["module.bert.pooler.dense.bias"] = torch.randn(width)
    torch.save({"epoch": 3, "step": 120, "name": "tiny", "state_dict": state}, path)


def read_like_loader(path):
    checkpoint = torch.load(path, weights_only=True)
    return {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}


@pytest.mark.parametrize("name", ["tiny-chinese-vit", "tiny-chinese-resnet"])
def test_cn_clip_checkpoint_loads_into_miniclip(tmp_path, name):
    config = tiny(name)
    reference = perturb_(cn_clip_reference(config))
    save_like_cn_clip(reference, tmp_path / "epoch3.pt")
    converted, ignored = cn_clip_to_miniclip(read_like_loader(tmp_path / "epoch3.pt"))
    assert ignored == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    model = MiniClip(config).eval()
    model.load_state_dict(converted, strict=True)
    pixel_values, input_ids, _ = bert_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), reference.encode_text(input_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-chinese-vit", "tiny-chinese-resnet"])
def test_flash_attention_layout_converts_identically(name):
    """cn_clip's own convert_state_dict writes the FlashAttention (FlashMHA) layout: fused `Wqkv`, `out_proj`."""
    state = cn_clip_reference(tiny(name)).state_dict()
    flash = convert_state_dict(dict(state))
    assert "bert.encoder.layer.0.attention.self.Wqkv.weight" in flash
    assert "bert.encoder.layer.0.attention.self.out_proj.bias" in flash
    assert "bert.encoder.layer.0.attention.self.query.weight" not in flash
    if name.endswith("vit"):
        assert "visual.transformer.resblocks.0.attn.Wqkv.weight" in flash
    plain, _ = cn_clip_to_miniclip(state)
    from_flash, ignored = cn_clip_to_miniclip(flash)
    assert ignored == [] and from_flash.keys() == plain.keys()
    assert all(torch.equal(from_flash[k], plain[k]) for k in plain)


def test_cn_clip_unknown_keys_pass_through():
    state = cn_clip_reference(tiny()).state_dict()
    state["bert.encoder.layer.0.attention.self.Wqkv.bias"] = torch.zeros(7)  # not a (q; k; v) stack
    state["mystery"] = torch.zeros(1)
    converted, _ = cn_clip_to_miniclip(state)
    assert "mystery" in converted and "bert.encoder.layer.0.attention.self.Wqkv.bias" in converted


def hf_chinese_folder(tmp_path, config, legacy_bin=False):
    hf_config = miniclip_config_to_hf_chinese_clip(config)
    torch.manual_seed(0)
    hf_model = perturb_(ChineseCLIPModel(ChineseCLIPConfig(**hf_config)))
    hf_model.save_pretrained(tmp_path)
    if legacy_bin:  # older files: persistent position_ids / token_type_ids buffers and a text pooler
        state = load_file(tmp_path / "model.safetensors")
        text = hf_model.text_model.embeddings
        state["text_model.embeddings.position_ids"] = text.position_ids.clone()
        state["text_model.embeddings.token_type_ids"] = text.token_type_ids.clone()
        state["vision_model.embeddings.position_ids"] = hf_model.vision_model.embeddings.position_ids.clone()
        width = config.text_cfg.width
        state["text_model.pooler.dense.weight"], state["text_model.pooler.dense.bias"] = torch.randn(
            width, width), torch.randn(width)
        torch.save(state, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    return hf_model


def assert_same_as_hf(hf_model, model, config):
    pixel_values, input_ids, attention_mask = bert_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values),
                                   features(hf_model.get_image_features(pixel_values=pixel_values)),
                                   atol=1e-5, rtol=0)
        hf_text = features(hf_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        torch.testing.assert_close(model.encode_text(input_ids, attention_mask), hf_text, atol=1e-5, rtol=0)
        # ChineseCLIP's text feature is the [CLS] state times text_projection (no pooler, no LayerNorm after it)
        cls = hf_model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        torch.testing.assert_close(hf_model.text_projection(cls), hf_text, atol=1e-6, rtol=0)


@pytest.mark.parametrize("legacy_bin", [False, True], ids=["safetensors", "legacy-bin"])
def test_hf_chinese_clip_folder_loads_into_miniclip(tmp_path, legacy_bin):
    config = tiny()
    hf_model = hf_chinese_folder(tmp_path, config, legacy_bin)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    state = (torch.load(tmp_path / "pytorch_model.bin", weights_only=True) if legacy_bin
             else load_file(tmp_path / "model.safetensors"))
    inferred = hf_chinese_clip_config_to_miniclip(hf_config)
    assert inferred.to_dict() == config.to_dict()
    assert inferred.quick_gelu and inferred.preprocess_cfg.resize_mode == "squash"
    converted, ignored = hf_chinese_clip_to_miniclip(state, hf_config)
    assert sorted(ignored) == (sorted(["text_model.embeddings.position_ids", "text_model.embeddings.token_type_ids",
                                       "vision_model.embeddings.position_ids", "text_model.pooler.dense.weight",
                                       "text_model.pooler.dense.bias"]) if legacy_bin else [])
    model = MiniClip(inferred).eval()
    model.load_state_dict(converted, strict=True)
    assert_same_as_hf(hf_model, model, config)


def test_miniclip_exports_to_chinese_clip_model(tmp_path):
    config = tiny()
    torch.manual_seed(0)
    model = perturb_(MiniClip(config))
    state = model.state_dict()
    hf_state = miniclip_to_hf_chinese_clip(state, config)
    save_file(hf_state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(miniclip_config_to_hf_chinese_clip(config)))
    hf_model, info = ChineseCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ChineseCLIPModel(hf_model.config).load_state_dict(hf_state, strict=True)
    assert_same_as_hf(hf_model.eval(), model, config)
    back, ignored = hf_chinese_clip_to_miniclip(hf_state, {"model_type": "chinese_clip"})
    assert ignored == [] and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_cn_clip_checkpoint_exports_to_hf_with_same_embeddings(tmp_path):
    """cn_clip reference -> MiniClip -> ChineseCLIPModel: the two real libraries agree through our converters."""
    config = tiny()
    reference = perturb_(cn_clip_reference(config))
    model = MiniClip(config).eval()
    model.load_state_dict(cn_clip_to_miniclip(reference.state_dict())[0], strict=True)
    hf_model = ChineseCLIPModel(ChineseCLIPConfig(**miniclip_config_to_hf_chinese_clip(config))).eval()
    hf_model.load_state_dict(miniclip_to_hf_chinese_clip(model.state_dict(), config), strict=True)
    pixel_values, input_ids, attention_mask = bert_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(features(hf_model.get_image_features(pixel_values=pixel_values)),
                                   reference.encode_image(pixel_values), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            features(hf_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)),
            reference.encode_text(input_ids), atol=1e-5, rtol=0)


def test_chinese_clip_vit_b_16_config_round_trip():
    config = dataclasses.replace(load_model_config("ChineseCLIP-ViT-B-16"), name=None)
    hf_config = miniclip_config_to_hf_chinese_clip(config)
    assert hf_config["vision_config"]["hidden_act"] == "quick_gelu"
    hf_default = ChineseCLIPConfig().vision_config.hidden_act  # HF's own default agrees: QuickGELU
    assert ChineseCLIPConfig.from_dict(hf_config).vision_config.hidden_act == hf_default
    assert hf_chinese_clip_config_to_miniclip(hf_config).to_dict() == config.to_dict()


def test_unsupported_chinese_models_are_refused():
    resnet = tiny("tiny-chinese-resnet")
    with pytest.raises(ValueError, match="no ResNet image tower"):
        miniclip_config_to_hf_chinese_clip(resnet)
    with pytest.raises(ValueError, match="no ResNet image tower"):
        miniclip_to_hf_chinese_clip(MiniClip(resnet).state_dict(), resnet)
    with pytest.raises(ValueError, match="text_cfg.tower='bert'"):
        miniclip_config_to_hf_chinese_clip(load_model_config("tiny-vit"))
    with pytest.raises(ValueError, match="model_type='clip'.*hf_clip_to_miniclip"):
        hf_chinese_clip_to_miniclip({}, {"model_type": "clip"})
    bad = miniclip_config_to_hf_chinese_clip(tiny())
    bad["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="vision_config.hidden_act='relu'"):
        hf_chinese_clip_config_to_miniclip(bad)


# --- through the loader core (checkpoints.py): detection, strict validation, export -----------------------------

@pytest.mark.parametrize("flash", [False, True], ids=["plain", "flash-attention"])
def test_load_pretrained_reads_cn_clip_file(tmp_path, flash):
    from miniclip.checkpoints import load_pretrained
    config = tiny()
    reference = perturb_(cn_clip_reference(config))
    save_like_cn_clip(reference, tmp_path / "epoch3.pt")
    if flash:  # the same file as cn_clip writes it when trained with use_flash_attention
        checkpoint = torch.load(tmp_path / "epoch3.pt", weights_only=True)
        checkpoint["state_dict"] = convert_state_dict(checkpoint["state_dict"])
        torch.save(checkpoint, tmp_path / "epoch3.pt")
    model = load_pretrained(tmp_path / "epoch3.pt")
    assert model.load_info.layout == "cn_clip"
    assert model.load_info.ignored == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    pixel_values, input_ids, _ = bert_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), reference.encode_text(input_ids), atol=1e-5, rtol=0)


def test_load_pretrained_and_save_hf_chinese_clip(tmp_path):
    from miniclip.checkpoints import load_pretrained, save_pretrained
    config = tiny()
    hf_model = hf_chinese_folder(tmp_path / "hf", config, legacy_bin=True)
    model = load_pretrained(tmp_path / "hf")
    assert model.load_info.layout == "hf_chinese_clip" and model.config.to_dict() == config.to_dict()
    assert_same_as_hf(hf_model, model, config)
    save_pretrained(model, tmp_path / "out", format="hf")
    exported, info = ChineseCLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same_as_hf(exported.eval(), model, config)
