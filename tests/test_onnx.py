"""ONNX export against the PyTorch model, run by the real onnxruntime: every tower family (ViT, ModifiedResNet,
causal text, BERT text) at two batch sizes and two text lengths (the empty caption, a full-context one), the fp16 /
int8 variants' error bounded on fresh inputs, a consumer that uses only onnxruntime + PIL + numpy, and bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install -e '.[serve]'")
import onnxruntime as ort  # noqa: E402

from miniclip.evaluation.encode import Encoder  # noqa: E402
from miniclip.model import MiniClip  # noqa: E402
from miniclip.serving.onnx import (ONNX_CONFIG, OnnxClip, OnnxExportError, OnnxGraphError, export_onnx,  # noqa: E402
                                   onnx_encoder)
from miniclip.tokenizer import get_tokenizer, trim_tokens  # noqa: E402
from miniclip.transforms import image_transform  # noqa: E402

# tiny-vit: ViT + causal text; tiny-resnet: ModifiedResNet (attention pool); tiny-chinese-vit: BERT text.
FAMILIES = ["tiny-vit", "tiny-resnet", "tiny-chinese-vit"]
# A caption that fills the context exactly: CLIP BPE <sot> + 75 x "a" + <eot> = 77; BERT [CLS] + 50 x 狗 + [SEP] = 52.
FULL = {"transformer": "a " * 75, "bert": "狗" * 50}
FP32_ATOL = 1e-4
FP16_MIN_COSINE, INT8_MIN_COSINE = 0.9999, 0.99  # measured on these models: >= 0.999999 and >= 0.998


def text_batches(model):
    """[""] alone (length 2) and three captions with a full-context one (length = context_length)."""
    tokenizer = get_tokenizer(model.config)
    full = FULL[model.config.text_cfg.tower]
    short, long = trim_tokens(tokenizer([""])), trim_tokens(tokenizer(["", "a dog on the grass", full]))
    assert short["input_ids"].shape == (1, 2) and long["input_ids"].shape == (3, model.config.text_cfg.context_length)
    return [short, long]


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_graphs_equal_pytorch(onnx_export, name):
    model, _, onnx_dir = onnx_export(name)
    served = OnnxClip(onnx_dir)
    size = model.config.vision_cfg.image_size
    with torch.inference_mode():
        for batch in (1, 3):
            pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(served.encode_image(pixel_values), model.encode_image(pixel_values),
                                       atol=FP32_ATOL, rtol=0)
        for tokens in text_batches(model):
            expected = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
            torch.testing.assert_close(served.encode_text(tokens["input_ids"], tokens["attention_mask"]), expected,
                                       atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_encoder_equals_the_pytorch_encoder(onnx_export, tmp_path, name):
    """Through Encoder (files decoded, batches of 2, captions trimmed per batch, L2-normalised)."""
    model, _, onnx_dir = onnx_export(name)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (90, 70), (40 * i, 200 - 30 * i, 90)).save(paths[-1])
    texts = ["", "a red square", FULL[model.config.text_cfg.tower], "两只狗在雪地里玩"]
    ours = onnx_encoder(onnx_dir, image_batch_size=2, text_batch_size=2, progress=False)
    reference = Encoder(model, image_transform(model.config), get_tokenizer(model.config), image_batch_size=2,
                        text_batch_size=2, progress=False)
    torch.testing.assert_close(ours.images(paths), reference.images(paths), atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ours.texts(texts), reference.texts(texts), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_fp16_and_int8_errors_are_stated_and_bounded(onnx_export, name):
    model, _, onnx_dir = onnx_export(name)
    stated = json.loads((onnx_dir / ONNX_CONFIG).read_text())["variants"]
    assert set(stated) == {"fp32", "fp16", "int8"}
    size = model.config.vision_cfg.image_size
    pixel_values = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))  # not the probe inputs
    tokens = text_batches(model)[1]
    with torch.inference_mode():
        image_ref = model.encode_image(pixel_values)
        text_ref = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    for variant, bound in (("fp32", 1 - 1e-6), ("fp16", FP16_MIN_COSINE), ("int8", INT8_MIN_COSINE)):
        assert min(stated[variant]["image_min_cosine"], stated[variant]["text_min_cosine"]) >= bound, variant
        served = OnnxClip(onnx_dir, variant)
        image_cos = torch.cosine_similarity(served.encode_image(pixel_values), image_ref, dim=-1)
        text_cos = torch.cosine_similarity(served.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                                           text_ref, dim=-1)
        assert float(torch.cat([image_cos, text_cos]).min()) >= bound, variant
    assert stated["fp16"]["image_max_abs_error"] > stated["fp32"]["image_max_abs_error"]  # fp16 really is fp16
    assert stated["int8"]["text_max_abs_error"] > stated["fp16"]["text_max_abs_error"]


def test_a_consumer_needs_only_onnxruntime_pil_and_numpy(onnx_export, tmp_path):
    """Preprocess from onnx_config.json by hand (PIL bicubic resize + center crop, mean / std), run the graph with
    onnxruntime directly, and score with the stored logit_scale: the PyTorch model's numbers."""
    model, _, onnx_dir = onnx_export("tiny-vit")
    info = json.loads((onnx_dir / ONNX_CONFIG).read_text())
    assert (onnx_dir / info["text"]["tokenizer"]["bpe_file"]).is_file() and (onnx_dir / "tokenizer_config.json").is_file()
    image = Image.new("RGB", (100, 70), (200, 40, 40))
    image.paste((20, 20, 220), (10, 10, 60, 50))
    size = info["image"]["image_size"]
    short, long = sorted(image.size)
    new = (size, int(size * long / short))  # shorter side to `size`, the longer one scaled and truncated
    resized = image.resize(new if image.width <= image.height else new[::-1], Image.BICUBIC)
    left, top = round((resized.width - size) / 2), round((resized.height - size) / 2)
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    pixels = ((pixels - info["image"]["mean"]) / info["image"]["std"]).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(onnx_dir / info["variants"]["fp32"]["image_encoder"]))
    image_embeds = session.run(None, {"pixel_values": pixels})[0]  # (1, D)
    with torch.inference_mode():
        expected = model.encode_image(image_transform(model.config)(image)[None])
    np.testing.assert_allclose(image_embeds, expected.numpy(), atol=FP32_ATOL, rtol=0)
    assert info["logit_scale"] == pytest.approx(float(model.logit_scale().detach()))


def test_bert_folder_carries_its_vocab(onnx_export):
    _, _, onnx_dir = onnx_export("tiny-chinese-vit")
    info = json.loads((onnx_dir / ONNX_CONFIG).read_text())
    assert info["text"]["inputs"] == ["input_ids", "attention_mask"] and info["text"]["pooling"] == "cls"
    assert (onnx_dir / "vocab.txt").is_file() and info["image"]["resize_mode"] == "squash"


# --- bad input --------------------------------------------------------------------------------------------------------
def test_exporting_what_is_not_a_miniclip_states_why(tmp_path):
    import open_clip
    torch.manual_seed(0)
    other = open_clip.model.CLIP(**MiniClip("tiny-vit").config.open_clip_cfg())
    with pytest.raises(OnnxExportError,
                       match=r"exports a miniclip.MiniClip, got open_clip.model.CLIP\. Load .*from_pretrained"):
        export_onnx(other, tmp_path)
    with pytest.raises(ValueError, match=r"variant='int4' is not one of \['fp32', 'fp16', 'int8'\]"):
        export_onnx(MiniClip("tiny-vit"), tmp_path, variants=("fp32", "int4"))
    with pytest.raises(ValueError, match="must include 'fp32'"):
        export_onnx(MiniClip("tiny-vit"), tmp_path, variants=("int8",))


class DataDependentTower(nn.Module):
    """An image tower whose control flow depends on pixel values: torch.export cannot capture it."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(3, dim)

    def forward(self, pixel_values):
        pooled = pixel_values.mean(dim=(2, 3))  # (B, 3)
        return self.proj(pooled) if pooled.sum() > 0 else -self.proj(pooled)


def test_an_untraceable_tower_states_why(tmp_path):
    model = MiniClip("tiny-vit").eval()
    model.image_encoder = DataDependentTower(model.config.embed_dim)
    with pytest.raises(OnnxExportError,
                       match=r"could not export image_encoder.onnx: .* must be traceable by torch.export"):
        export_onnx(model, tmp_path / "out", variants=("fp32",))
    assert not (tmp_path / "out" / "image_encoder.onnx").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_graph_gives_a_one_line_error(onnx_export, tmp_path, damage):
    _, _, onnx_dir = onnx_export("tiny-vit")
    broken = shutil.copytree(onnx_dir, tmp_path / "broken")
    graph = broken / "text_encoder.onnx"
    graph.write_bytes(b"not a protobuf \x00\xff" * 10 if damage == "garbage" else graph.read_bytes()[:5000])
    with pytest.raises(OnnxGraphError) as raised:
        OnnxClip(broken)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{graph} is not a readable ONNX graph")
    assert "python -m miniclip.apps.export" in message


def test_a_folder_that_is_not_an_export_says_so(onnx_export, tmp_path):
    with pytest.raises(OnnxGraphError, match=f"no {ONNX_CONFIG}"):
        OnnxClip(tmp_path)
    _, _, onnx_dir = onnx_export("tiny-vit")
    partial = shutil.copytree(onnx_dir, tmp_path / "partial")
    (partial / "image_encoder.int8.onnx").unlink()
    with pytest.raises(OnnxGraphError, match="ONNX graph not found: .*image_encoder.int8.onnx"):
        OnnxClip(partial, "int8")


def test_towers_over_the_protobuf_limit_keep_weights_beside_the_graph(tmp_path, monkeypatch):
    """Towers above EXTERNAL_DATA_BYTES (ViT-L and up) are written as `<graph>.onnx` + `<graph>.onnx.data`; the
    threshold is lowered here so a tiny model takes that path."""
    import miniclip.serving.onnx as serving_onnx
    monkeypatch.setattr(serving_onnx, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    model = MiniClip("tiny-vit").eval()
    export_onnx(model, tmp_path, variants=("fp32", "fp16"))
    assert sorted(p.name for p in tmp_path.glob("*.data")) == [
        "image_encoder.fp16.onnx.data", "image_encoder.onnx.data", "text_encoder.fp16.onnx.data", "text_encoder.onnx.data"]
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(OnnxClip(tmp_path).encode_image(pixel_values), model.encode_image(pixel_values),
                                   atol=FP32_ATOL, rtol=0)
