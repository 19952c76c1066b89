import json
from pathlib import Path

import pytest

from miniclip.config import ClipConfig, list_model_configs, load_model_config
from miniclip.model import MiniClip

EXPECTED = {"OpenAI-RN50", "OpenAI-ViT-B-32", "OpenAI-ViT-B-16", "ChineseCLIP-ViT-B-16", "ChineseCLIP-RN50",
            "TinyCLIP-ViT-39M-16-Text-19M", "TinyCLIP-ViT-8M-16-Text-3M", "TinyCLIP-ViT-40M-32-Text-19M",
            "TinyCLIP-ViT-61M-32-Text-29M", "TinyCLIP-ResNet-19M-Text-19M", "TinyCLIP-ResNet-30M-Text-29M",
            "tiny-vit", "tiny-resnet", "tiny-chinese-vit", "tiny-chinese-resnet"}


def test_all_published_configs_present():
    assert EXPECTED <= set(list_model_configs())


def test_name_and_path_both_work(tmp_path):
    by_name = load_model_config("tiny-vit")
    path = tmp_path / "mine.json"
    by_name.save(path)
    by_path = load_model_config(str(path))
    assert by_path.to_dict() == {**by_name.to_dict(), "name": "tiny-vit"}
    assert load_model_config(by_name.to_dict()).vision_cfg == by_name.vision_cfg


def _tiny(**overrides):
    data = load_model_config("tiny-vit").to_dict()
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[key] = value
    return data


@pytest.mark.parametrize("overrides, message", [
    ({"vision_cfg.widht": 64}, r"unknown key\(s\) \['widht'\] in config: vision_cfg"),
    ({"text_cfg.heads": 3}, r"text_cfg: width=64 is not divisible by heads=3"),
    ({"vision_cfg.patch_size": 24}, r"image_size=64 is not divisible by patch_size=24"),
    ({"vision_cfg.head_width": 48}, r"width=64 is not divisible by head_width=48"),
    ({"vision_cfg.layers": [1, 2, 3]}, r"a ResNet needs 4 positive stage depths"),
    ({"vision_cfg.layers": [1, 1, 0, 1]}, r"a ResNet needs 4 positive stage depths"),
    ({"vision_cfg.layers": 0}, r"must be a positive int"),
    ({"text_cfg.tower": "roberta"}, r"text_cfg.tower='roberta' is not one of \['transformer', 'bert', 'hf'\]"),
    ({"preprocess_cfg.resize_mode": "crop"}, r"resize_mode='crop' is not one of"),
    ({"embed_dim": 0}, r"embed_dim=0 must be positive"),
    ({"text_cfg.context_length": 600, "text_cfg.tower": "bert"}, r"exceeds max_position_embeddings=512"),
])
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        ClipConfig.from_dict(_tiny(**overrides))


def test_resnet_image_size_multiple_of_32():
    data = load_model_config("tiny-resnet").to_dict()
    data["vision_cfg"]["image_size"] = 80
    with pytest.raises(ValueError, match="multiple of 32"):
        ClipConfig.from_dict(data)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown model config 'ViT-Z-99'.*Available model configs: .*OpenAI-ViT-B-32"):
        load_model_config("ViT-Z-99")


def test_missing_key_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['text_cfg'\]"):
        ClipConfig.from_dict({"embed_dim": 8, "vision_cfg": {}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_model_config(str(bad))


def test_every_config_file_is_canonical_json():
    # each shipped file parses and round-trips without unknown keys
    for name in list_model_configs():
        cfg = load_model_config(name)
        assert ClipConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_builds(name):
    model = MiniClip(name)
    assert model.num_parameters() > 0


# --- published values -------------------------------------------------------------------------------------------
# TinyCLIP's published open_clip-style configs (microsoft/Cream, TinyCLIP/src/open_clip/model_configs/*.json):
# (embed_dim, vision image_size, layers, width, patch_size, text width, heads, layers); all use GELU.
TINYCLIP_PUBLISHED = {
    "TinyCLIP-ViT-39M-16-Text-19M": (512, 224, 12, 512, 16, 512, 8, 6),
    "TinyCLIP-ViT-8M-16-Text-3M": (512, 224, 10, 256, 16, 256, 4, 3),
    "TinyCLIP-ViT-40M-32-Text-19M": (512, 224, 12, 512, 32, 512, 8, 6),
    "TinyCLIP-ViT-61M-32-Text-29M": (512, 224, 12, 640, 32, 512, 8, 9),
    "TinyCLIP-ResNet-19M-Text-19M": (1024, 224, [3, 4, 6, 3], 44, None, 512, 8, 6),
    "TinyCLIP-ResNet-30M-Text-29M": (1024, 224, [3, 4, 6, 3], 56, None, 512, 8, 9),
}


@pytest.mark.parametrize("name", sorted(TINYCLIP_PUBLISHED))
def test_tinyclip_configs_equal_published(name):
    c = load_model_config(name)
    v, t = c.vision_cfg, c.text_cfg
    ours = (c.embed_dim, v.image_size, v.layers, v.width, v.patch_size if not v.is_resnet else None,
            t.width, t.heads, t.layers)
    assert ours == TINYCLIP_PUBLISHED[name]
    assert c.quick_gelu is False and t.context_length == 77 and t.vocab_size == 49408


@pytest.mark.parametrize("name, reference", [("OpenAI-RN50", "RN50-quickgelu"), ("OpenAI-ViT-B-32", "ViT-B-32-quickgelu"),
                                             ("OpenAI-ViT-B-16", "ViT-B-16-quickgelu")])
def test_openai_configs_equal_open_clip_shipped(name, reference):
    """Against the JSON files the installed open_clip_torch ships (its OpenAI-pretrained model definitions)."""
    import open_clip
    ref = open_clip.get_model_config(reference)
    ours = load_model_config(name).open_clip_cfg()
    assert ours["embed_dim"] == ref["embed_dim"] and ours["quick_gelu"] is True is ref["quick_gelu"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in ref[tower].items():
            assert ours[tower][key] == value or (key == "patch_size" and value is None), (tower, key)


@pytest.mark.parametrize("name, vision_json, text_json", [
    ("ChineseCLIP-ViT-B-16", "ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    ("ChineseCLIP-RN50", "RN50", "RBT3-chinese")])
def test_chinese_clip_configs_equal_cn_clip_shipped(name, vision_json, text_json):
    """Against the JSON files inside the installed cn_clip wheel (cn_clip/clip/model_configs/)."""
    import cn_clip.clip
    folder = Path(cn_clip.clip.__file__).parent / "model_configs"
    vision = json.loads((folder / f"{vision_json}.json").read_text())
    text = json.loads((folder / f"{text_json}.json").read_text())
    c = load_model_config(name)
    v, t = c.vision_cfg, c.text_cfg
    layers = json.loads(vision["vision_layers"]) if isinstance(vision["vision_layers"], str) else vision["vision_layers"]
    assert (c.embed_dim, v.image_size, v.layers, v.width) == (vision["embed_dim"], vision["image_resolution"], layers,
                                                              vision["vision_width"])
    assert v.is_resnet or v.patch_size == vision["vision_patch_size"]
    assert (t.tower, t.vocab_size, t.width, t.layers, t.heads, t.intermediate_size, t.max_position_embeddings,
            t.type_vocab_size, t.hidden_act) == ("bert", text["vocab_size"], text["text_hidden_size"],
                                                 text["text_num_hidden_layers"], text["text_num_attention_heads"],
                                                 text["text_intermediate_size"], text["text_max_position_embeddings"],
                                                 text["text_type_vocab_size"], text["text_hidden_act"])
    assert t.context_length == 52 and c.quick_gelu is True and c.preprocess_cfg.resize_mode == "squash"
