"""evaluation/encode.py (Encoder) against the model run by hand and metrics on hand-made embeddings; real image files, a real model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from miniclip import MiniClip, get_tokenizer, image_transform
from miniclip.data.captions import CaptionFileError, read_caption_file
from miniclip.evaluation.encode import Encoder, evaluate_retrieval, flatten_captions
from miniclip.transforms import ImageDecodeError, load_image
from miniclip.evaluation.metrics import retrieval_metrics


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MiniClip("tiny-vit")
    return model, get_tokenizer(model.config), image_transform(model.config)


def make_images(folder, n, size=(80, 60), fmt="PNG"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"im{i}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
        paths.append(path)
    return paths


def test_encode_images_matches_model(tiny, tmp_path):
    model, _, transform = tiny
    paths = make_images(tmp_path, 5)
    model.train()
    got = Encoder(model, transform, image_batch_size=2, progress=False).images(paths)
    assert model.training, "encode_images must restore the model's mode"
    model.eval()
    with torch.no_grad():
        pixel_values = torch.stack([transform(Image.open(p)) for p in paths])
        expected = model.encode_image(pixel_values, normalize=True)
    assert got.shape == (5, model.config.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # PIL images are accepted as they are
    pil = Encoder(model, transform, progress=False).images([Image.open(p) for p in paths])
    torch.testing.assert_close(pil, expected, atol=1e-5, rtol=1e-5)


def test_encode_texts_matches_model_untrimmed(tiny):
    model, tokenizer, _ = tiny
    texts = ["a dog", "two brown dogs wrestle in the snow .", "x", "a photo of a very long " + "word " * 100]
    got = Encoder(model, tokenizer=tokenizer, text_batch_size=3, progress=False).texts(texts)
    model.eval()
    with torch.no_grad():
        expected = model.encode_text(tokenizer(texts)["input_ids"], normalize=True)  # full 77 columns
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_encode_texts_bert_matches_model():
    torch.manual_seed(0)
    model = MiniClip("tiny-chinese-vit").eval()
    tokenizer = get_tokenizer(model.config)
    texts = ["一只狗", "两只棕色的狗在雪地里玩耍", "猫"]
    got = Encoder(model, tokenizer=tokenizer, text_batch_size=2, progress=False).texts(texts)
    with torch.no_grad():
        tokens = tokenizer(texts)
        expected = model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny):
    model, tokenizer, _ = tiny
    texts = ["a dog", "a cat on a mat"]
    fp32 = Encoder(model, tokenizer=tokenizer, progress=False).texts(texts)
    bf16 = Encoder(model, tokenizer=tokenizer, dtype=torch.bfloat16, progress=False).texts(texts)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05
    assert not torch.equal(fp32, bf16)  # autocast really ran in bf16


def test_jpeg_draft_decode_close_to_full(tmp_path):
    (path,) = make_images(tmp_path, 1, size=(640, 480), fmt="JPEG")
    small = load_image(path, draft_size=64)
    assert min(small.size) >= 64 and small.size[0] < 640  # decoded at 1/4 or 1/8 scale
    full = Image.open(path).convert("RGB")
    assert load_image(path).size == full.size


def test_evaluate_retrieval_equals_metrics_on_encodings(tiny, tmp_path):
    model, tokenizer, transform = tiny
    paths = make_images(tmp_path / "images", 4)
    entries = [{"image": f"images/{p.name}", "caption": [f"caption {i}", f"another {i}"][: 1 + i % 2]}
               for i, p in enumerate(paths)]
    (tmp_path / "val.json").write_text(json.dumps(entries))
    records = read_caption_file(tmp_path / "val.json")
    texts, text_to_image = flatten_captions(records)
    assert text_to_image.tolist() == [0, 1, 1, 2, 3, 3]
    got = evaluate_retrieval(Encoder(model, transform, tokenizer, image_batch_size=3, progress=False), records)
    encoder = Encoder(model, transform, tokenizer, progress=False)
    expected = retrieval_metrics(encoder.images(paths), encoder.texts(texts), text_to_image)
    assert got == pytest.approx(expected)
    assert set(got) == {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10",
                        "t2i_median_rank", "i2t_median_rank", "mean_recall"}


def test_unreadable_image_names_file(tiny, tmp_path):
    model, _, transform = tiny
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        Encoder(model, transform, progress=False).images([bad])


def test_caption_file_without_captions_errors(tmp_path):
    make_images(tmp_path / "images", 1)
    (tmp_path / "val.json").write_text(json.dumps([{"image": "images/im0.png", "caption": []}]))
    with pytest.raises(CaptionFileError, match="entry 0.*captions must be a non-empty list"):
        read_caption_file(tmp_path / "val.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(CaptionFileError, match="no usable samples"):
        read_caption_file(tmp_path / "empty.json")
