import numpy as np
import pytest
import torch
from PIL import Image

from miniclip.config import load_model_config
from miniclip.transforms import image_transform, to_rgb


def _photo(w=96, h=72, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_equals_open_clip():
    import open_clip
    config = load_model_config("tiny-vit")
    ours = image_transform(config, train=False)
    ref = open_clip.image_transform(config.vision_cfg.image_size, is_train=False)
    image = _photo()
    torch.testing.assert_close(ours(image), ref(image))


def test_chinese_clip_squashes_without_crop():
    from torchvision import transforms as T
    config = load_model_config("tiny-chinese-vit")
    image = _photo(120, 60)
    out = image_transform(config, train=False)(image)
    # Chinese-CLIP's eval preprocessing: Resize((S, S), bicubic) then normalise, no crop.
    ref = T.Compose([T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                     T.Normalize(config.preprocess_cfg.mean, config.preprocess_cfg.std)])(image)
    torch.testing.assert_close(out, ref)


def test_train_transform_shape_and_randomness():
    config = load_model_config("tiny-vit")
    t = image_transform(config, train=True)
    torch.manual_seed(0)
    a, b = t(_photo()), t(_photo())
    assert a.shape == (3, 64, 64) and not torch.equal(a, b)


def _flickr_like(w=500, h=375):
    """A photo-like image: smooth gradients + noise (resampling differences show on edges and texture)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx + yy) % 256, (yy * 2) % 256, (xx * 3) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (230, 224), (40, 90)])  # down, nearly equal, up
def test_train_transform_on_tensors_matches_pil_crop_for_crop(size):
    """The same RNG state gives the same crop box; pixels differ by rounding only (<= 2 of 255 levels)."""
    from miniclip.transforms import pil_train_transform
    config = load_model_config("tiny-vit")
    image = _flickr_like(*size)
    std = torch.tensor(config.preprocess_cfg.std).view(3, 1, 1)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = image_transform(config, train=True)(image)
        torch.manual_seed(seed)
        reference = pil_train_transform(config)(image)
        levels = ((ours - reference) * std * 255).abs()
        assert levels.max() <= 2.01 and levels.mean() < 0.1, (seed, levels.max(), levels.mean())


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode):
    base = _photo()
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == base.size
    out = image_transform(load_model_config("tiny-vit"))(image)
    assert out.shape == (3, 64, 64) and torch.isfinite(out).all()


def test_sixteen_bit_keeps_contrast():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.min() == 0 and rgb.max() == 255  # not clipped to white


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(image)).min() == 255
