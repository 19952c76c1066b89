import json

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
    ({"text_cfg.tower": "roberta"}, r"text_cfg.tower='roberta' is not one of \['transformer', 'bert'\]"),
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
