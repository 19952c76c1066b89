"""zeroshot.py: templates against open_clip's and cn_clip's shipped lists, the ensembled classifier against a
per-class loop over the real model, and the image-folder reader on real files (good and bad)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from miniclip import MiniClip, get_tokenizer
from miniclip.config import load_model_config
from miniclip.evaluation.encode import Encoder
from miniclip.evaluation.zeroshot import (CHINESE_IMAGENET_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, get_templates,
                               read_image_folder, zeroshot_classifier)


def test_english_templates_equal_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as reference
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert [t.format("goldfish") for t in OPENAI_IMAGENET_TEMPLATES] == [f("goldfish") for f in reference]


def test_chinese_templates_equal_cn_clip():
    from cn_clip.eval.imagenet_zeroshot_templates import openai_imagenet_template as reference
    assert [t.format("金鱼") for t in CHINESE_IMAGENET_TEMPLATES] == [f("金鱼") for f in reference]


def test_template_choice():
    assert get_templates("auto", load_model_config("tiny-chinese-vit")) is CHINESE_IMAGENET_TEMPLATES
    assert get_templates("auto", load_model_config("tiny-vit")) is OPENAI_IMAGENET_TEMPLATES
    assert get_templates("simple") == ("a photo of a {}.",)
    with pytest.raises(ValueError, match=r"templates='french' is not one of \['auto', 'english'"):
        get_templates("french")


def test_classifier_is_mean_of_normalised_embeddings_renormalised():
    torch.manual_seed(0)
    model = MiniClip("tiny-vit").eval()
    tokenizer = get_tokenizer(model.config)
    classes, templates = ["dog", "cat", "sea turtle"], OPENAI_IMAGENET_TEMPLATES[:7]
    got = zeroshot_classifier(Encoder(model, tokenizer=tokenizer, text_batch_size=5, progress=False), classes, templates)
    with torch.no_grad():
        expected = []
        for name in classes:  # CLIP's recipe, one class at a time on the full (untrimmed) token rows
            embeds = model.encode_text(tokenizer([t.format(name) for t in templates])["input_ids"], normalize=True)
            mean = embeds.mean(0)
            expected.append(mean / mean.norm())
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="slot"):
        zeroshot_classifier(Encoder(model, tokenizer=tokenizer, progress=False), classes, ["no slot here"])


def make_folder(root, classes=("cat", "dog"), n=2):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "set", classes=("sea_turtle", "ant"))
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / ".DS_Store").write_text("hidden")
    folder = read_image_folder(root)
    assert folder.folders == ["ant", "sea_turtle"] and folder.classnames == ["ant", "sea turtle"]
    assert folder.labels == [0, 0, 1, 1] and folder.ignored == 1
    assert [p.name for p in folder.paths] == ["0.jpg", "1.jpg", "0.jpg", "1.jpg"]
    (tmp_path / "map.json").write_text(json.dumps({"ant": "蚂蚁", "sea_turtle": "海龟"}))
    assert read_image_folder(root, tmp_path / "map.json").classnames == ["蚂蚁", "海龟"]


def test_image_folder_errors(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty_class has no image files"):
        read_image_folder(root)
    (root / "empty_class").rmdir()
    (tmp_path / "map.json").write_text(json.dumps({"cat": "kitty"}))
    with pytest.raises(ValueError, match=r"no entry for folder\(s\) \['dog'\]"):
        read_image_folder(root, tmp_path / "map.json")
    with pytest.raises(FileNotFoundError, match="zero-shot image folder not found"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        read_image_folder(tmp_path / "flat")
