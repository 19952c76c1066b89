import pytest
import torch

from miniclip.config import load_model_config
from miniclip.model import ClipOutput, MiniClip
from conftest import cn_clip_reference, open_clip_reference, reference_to_miniclip

OPEN_CLIP_FAMILY = ["OpenAI-RN50", "OpenAI-ViT-B-32", "OpenAI-ViT-B-16", "TinyCLIP-ViT-39M-16-Text-19M",
                    "TinyCLIP-ViT-8M-16-Text-3M", "TinyCLIP-ViT-40M-32-Text-19M", "TinyCLIP-ViT-61M-32-Text-29M",
                    "TinyCLIP-ResNet-19M-Text-19M", "TinyCLIP-ResNet-30M-Text-29M"]
CHINESE_FAMILY = ["ChineseCLIP-ViT-B-16", "ChineseCLIP-RN50"]


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", OPEN_CLIP_FAMILY)
def test_parameter_count_matches_open_clip(name):
    config = load_model_config(name)
    with torch.device("meta"):
        ours, ref = MiniClip(config), open_clip_reference(config)
    assert _count(ours) == _count(ref)


@pytest.mark.parametrize("name", CHINESE_FAMILY)
def test_parameter_count_matches_cn_clip(name):
    config = load_model_config(name)
    with torch.device("meta"):
        ours, ref = MiniClip(config), cn_clip_reference(config)
    assert _count(ours) == _count(ref)


def test_tinyclip_40m_size_is_published_size():
    # TinyCLIP-ViT-40M-32-Text-19M: 39.6M image + 44.6M text parameters (84.2M total).
    with torch.device("meta"):
        model = MiniClip("TinyCLIP-ViT-40M-32-Text-19M")
    assert round(_count(model) / 1e6, 1) == 84.2


def _copy_from(reference, config):
    model = MiniClip(config).eval()
    state = reference_to_miniclip(reference.state_dict())
    model.load_state_dict(state, strict=True)
    return model


def _inputs(config, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    t = config.text_cfg
    lengths = torch.randint(2, t.context_length, (batch,), generator=g)
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, t.vocab_size - 2, (int(n),), generator=g)
        input_ids[i, n - 1] = t.vocab_size - 1 if t.tower == "transformer" else 102  # EOT / [SEP]
        if t.tower == "bert":
            input_ids[i, 0] = 101  # [CLS]
    return pixel_values, input_ids


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
@pytest.mark.parametrize("normalize", [False, True])
def test_equivalent_to_open_clip(name, normalize):
    config = load_model_config(name)
    reference = open_clip_reference(config)
    model = _copy_from(reference, config)
    pixel_values, input_ids = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values, normalize=normalize),
                                   reference.encode_image(pixel_values, normalize=normalize), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids, normalize=normalize),
                                   reference.encode_text(input_ids, normalize=normalize), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-chinese-vit", "tiny-chinese-resnet"])
@pytest.mark.parametrize("normalize", [False, True])
def test_equivalent_to_cn_clip(name, normalize):
    config = load_model_config(name)
    reference = cn_clip_reference(config)
    model = _copy_from(reference, config)
    pixel_values, input_ids = _inputs(config)
    norm = (lambda x: torch.nn.functional.normalize(x, dim=-1)) if normalize else (lambda x: x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values, normalize=normalize),
                                   norm(reference.encode_image(pixel_values)), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids, normalize=normalize),
                                   norm(reference.encode_text(input_ids)), atol=1e-5, rtol=0)


def test_forward_output_is_typed_and_normalised():
    config = load_model_config("tiny-vit")
    model = MiniClip(config).eval()
    pixel_values, input_ids = _inputs(config)
    out = model(pixel_values=pixel_values, input_ids=input_ids)
    assert isinstance(out, ClipOutput)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    only_text = model(input_ids=input_ids)
    assert isinstance(only_text, ClipOutput) and only_text.image_embeds is None


def test_parameter_names_follow_tutorial_layout():
    names = set(MiniClip("tiny-vit").state_dict())
    assert "logit_scale.logit_scale" in names
    assert "image_encoder.visual.conv1.weight" in names
    assert "text_encoder.token_embedding.weight" in names and "text_encoder.text_projection" in names
    bert_names = set(MiniClip("tiny-chinese-vit").state_dict())
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in bert_names
    assert not any("pooler" in n or "position_ids" in n for n in bert_names)


def test_trimmed_padding_gives_same_text_embeds():
    config = load_model_config("tiny-vit")
    model = MiniClip(config).eval()
    _, input_ids = _inputs(config, batch=4)
    last = int(input_ids.ne(0).sum(1).max())
    with torch.no_grad():
        full = model.encode_text(input_ids)
        trimmed = model.encode_text(input_ids[:, :last])
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)
