"""Weight inheritance: a student built from a subset of the teacher's layers computes exactly what that sub-network of
the teacher computes (ViT, causal text, BERT text), narrower students hold the leading channels / heads, what cannot
be inherited is refused with the reason, and train.py --inherit_from starts from the teacher's weights."""
import copy
import logging

import pytest
import torch

import miniclip
from miniclip.apps import train
from miniclip.checkpoints.inherit import InheritError, inherit
from miniclip.config import ClipConfig, load_model_config
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from test_train import _flags, make_caption_set


def _config(name="tiny-vit", **sections) -> ClipConfig:
    """A tiny config with some fields changed: _config(vision_cfg={"layers": 4}, embed_dim=96)."""
    data = load_model_config(name).to_dict()
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return ClipConfig.from_dict(data)


def _teacher(name="tiny-vit", seed=0, **sections) -> MiniClip:
    torch.manual_seed(seed)
    return MiniClip(_config(name, **sections)).eval()


def _inputs(config, n=3):
    g = torch.Generator().manual_seed(1)
    size = config.vision_cfg.image_size
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g),
            **get_tokenizer(config)(["a dog on the grass", "two people walking", "a red car"][:n])}


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-chinese-vit"])
def test_inherited_layers_compute_the_teachers_sub_network(name):
    teacher = _teacher(name, vision_cfg={"layers": 4}, text_cfg={"layers": 4})
    student, report = inherit(teacher, _config(name), layers="uniform")
    assert report.layers == {"image": [0, 3], "text": [0, 3]} and report.fresh == []
    # the reference: the teacher itself with its blocks 1 and 2 cut out
    reference = copy.deepcopy(teacher)
    blocks = reference.image_encoder.visual.transformer.resblocks
    reference.image_encoder.visual.transformer.resblocks = torch.nn.ModuleList([blocks[0], blocks[3]])
    if name == "tiny-chinese-vit":
        layers = reference.text_encoder.bert.encoder.layer
        reference.text_encoder.bert.encoder.layer = torch.nn.ModuleList([layers[0], layers[3]])
    else:
        blocks = reference.text_encoder.transformer.resblocks
        reference.text_encoder.transformer.resblocks = torch.nn.ModuleList([blocks[0], blocks[3]])
    inputs = _inputs(student.config)
    with torch.no_grad():
        got, expected = student.eval()(**inputs), reference(**inputs)
    assert torch.equal(got.image_embeds, expected.image_embeds) and torch.equal(got.text_embeds, expected.text_embeds)
    assert got.logit_scale == teacher.logit_scale()


def test_explicit_layer_list_and_report_table():
    teacher = _teacher(vision_cfg={"layers": 4}, text_cfg={"layers": 4})
    student, report = inherit(teacher, _config(), layers=[1, 2])
    sources = report.sources
    assert sources["image_encoder.visual.transformer.resblocks.0.mlp.c_fc.weight"] == \
        "image_encoder.visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert sources["text_encoder.transformer.resblocks.1.ln_2.bias"] == "text_encoder.transformer.resblocks.2.ln_2.bias"
    assert "text_encoder.token_embedding.weight <- text_encoder.token_embedding.weight" in report.table()
    with pytest.raises(InheritError, match="must name 2 distinct teacher layers"):
        inherit(teacher, _config(), layers=[0, 4])


def test_narrower_student_keeps_leading_channels_and_heads():
    # teacher: width 128 = 4 heads of 32 (both towers), embed 96; student: width 64 = its first 2 heads, embed 64
    teacher = _teacher(vision_cfg={"width": 128}, text_cfg={"width": 128, "heads": 4}, embed_dim=96)
    student, report = miniclip.inherit(teacher, _config())
    t, s = teacher.state_dict(), student.state_dict()
    key = "image_encoder.visual.transformer.resblocks.1.attn.in_proj_weight"
    q, k, v = t[key].chunk(3)  # (128, 128) each
    assert torch.equal(s[key], torch.cat([q[:64, :64], k[:64, :64], v[:64, :64]]))
    assert report.sources[key].endswith("[q,k,v :64 each, :64]")
    bias = "text_encoder.transformer.resblocks.0.attn.in_proj_bias"
    assert torch.equal(s[bias], torch.cat([part[:64] for part in t[bias].chunk(3)]))
    fc = "text_encoder.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(s[fc], t[fc][:256, :64]) and report.sources[fc].endswith("[:256, :64]")
    assert torch.equal(s["image_encoder.visual.proj"], t["image_encoder.visual.proj"][:64, :64])
    assert torch.equal(s["text_encoder.token_embedding.weight"], t["text_encoder.token_embedding.weight"][:, :64])
    assert "inherited 62 tensors (61 sliced" in report.summary()  # all but the logit scale


def test_other_image_size_and_a_fresh_logit_bias():
    teacher = _teacher()
    student, report = inherit(teacher, _config(vision_cfg={"image_size": 32}, init_logit_bias=-10.0))
    assert report.fresh == ["logit_bias.logit_bias"]
    assert student.logit_bias.logit_bias.item() == -10.0
    assert "grid resampled to 2x2" in report.sources["image_encoder.visual.positional_embedding"]
    assert student.state_dict()["image_encoder.visual.positional_embedding"].shape == (5, 64)


def test_resnet_inherits_blocks_per_stage():
    teacher = _teacher("tiny-resnet", vision_cfg={"layers": [2, 3, 2, 2]})
    student, report = inherit(teacher, _config("tiny-resnet"))
    assert report.layers["image.layer2"] == [0] and report.fresh == []
    assert torch.equal(student.state_dict()["image_encoder.visual.layer3.0.conv2.weight"],
                       teacher.state_dict()["image_encoder.visual.layer3.0.conv2.weight"])


@pytest.mark.parametrize("teacher_name,teacher_sections,student_name,student_sections,message", [
    ("tiny-resnet", {}, "tiny-resnet", {"vision_cfg": {"width": 8}}, "ResNet width 8 differs from the teacher's 16"),
    ("tiny-vit", {}, "tiny-vit", {"vision_cfg": {"layers": 3}}, "the student has 3 layers, the teacher only 2"),
    ("tiny-chinese-vit", {}, "tiny-vit", {}, "'transformer' cannot inherit from the teacher's 'bert'"),
    ("tiny-vit", {}, "tiny-vit", {"vision_cfg": {"patch_size": 8}}, "patch_size 8 differs"),
    ("tiny-vit", {}, "tiny-vit", {"text_cfg": {"width": 128, "heads": 4}}, "the student's 128 exceeds the teacher's 64"),
    ("tiny-vit", {}, "tiny-resnet", {}, "both be ViTs or both ResNets"),
    ("tiny-vit", {"vision_cfg": {"width": 128, "head_width": 64}}, "tiny-vit", {}, "head_width 32 differs"),
])
def test_what_cannot_be_inherited_is_refused(teacher_name, teacher_sections, student_name, student_sections, message):
    with pytest.raises(InheritError, match=message):
        inherit(_teacher(teacher_name, **teacher_sections), _config(student_name, **student_sections))


def test_train_inherit_from_starts_at_the_teachers_weights(tmp_path, caplog):
    teacher = _teacher(vision_cfg={"layers": 4}, text_cfg={"layers": 4}, seed=5)
    teacher.save_pretrained(tmp_path / "teacher", tokenizer=get_tokenizer(teacher.config))
    caplog.set_level(logging.INFO, logger="miniclip")
    result = train.main(_flags(tmp_path / "student", train_file=make_caption_set(tmp_path), max_steps=1,
                               learning_rate=1e-9, inherit_from=tmp_path / "teacher", inherit_layers="1,3"))
    assert "inherited 62 tensors" in caplog.text and "image layers [1, 3]" in caplog.text
    got = result.trainer.model.state_dict()
    expected = teacher.state_dict()
    worst = (got["image_encoder.visual.transformer.resblocks.0.attn.in_proj_weight"]
             - expected["image_encoder.visual.transformer.resblocks.1.attn.in_proj_weight"]).abs().max()
    assert worst < 1e-6  # one step at lr 1e-9: still the teacher's layer 1
