"""Retrieval against the field's reference evaluator: the `clip-benchmark` package's own
`zeroshot_retrieval.evaluate`, fed by open_clip's reference eval transform on fully decoded JPEGs, gives the same
R@1/5/10 both ways as test.py (apps/evaluate.py) and the trainer's in-training retrieval, on real Flickr8k files."""
import json

import pytest
import torch
from PIL import Image

from miniclip.checkpoints import save_pretrained
from miniclip.data.captions import read_caption_file
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.transforms import image_transform, load_image

N_IMAGES = 40  # the first 40 test images: 200 captions, no caption shared between two images


@pytest.fixture(scope="module")
def caption_file(tmp_path_factory):
    from conftest import shared_data_dir
    data = shared_data_dir()
    if data is None:
        pytest.skip("real data folder not found: set MINICLIP_DATA=/path/to/shared/data")
    entries = json.loads((data / "flickr8k" / "en_test.json").read_text())[:N_IMAGES]
    folder = tmp_path_factory.mktemp("captions")
    (folder / "en_test_40.json").write_text(json.dumps(entries))
    return folder / "en_test_40.json", data / "flickr8k"  # the file, and the folder its image paths are under


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniClip("tiny-vit").eval()
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "tiny-vit")


def _reference_transform(config):
    import open_clip
    p = config.preprocess_cfg
    return open_clip.image_transform(config.vision_cfg.image_size, is_train=False, mean=p.mean, std=p.std,
                                     resize_mode=p.resize_mode)


class _Towers(torch.nn.Module):
    """What clip_benchmark calls: encode_image(images), encode_text(token ids)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def encode_text(self, input_ids):
        return self.model.encode_text(input_ids)


def _clip_benchmark(model, records) -> dict:
    from clip_benchmark.metrics import zeroshot_retrieval
    transform, tokenizer = _reference_transform(model.config), get_tokenizer(model.config)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            with Image.open(records[i].image) as image:
                return transform(image), list(records[i].captions)

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=16, collate_fn=lambda batch: (
        torch.stack([pixels for pixels, _ in batch]), [captions for _, captions in batch]))
    raw = zeroshot_retrieval.evaluate(_Towers(model), loader, lambda texts: tokenizer(texts)["input_ids"], "cpu",
                                      amp=False, recall_k_list=[1, 5, 10])
    return {f"{d}_R@{k}": 100 * raw[f"{name}_retrieval_recall@{k}"] for d, name in (("t2i", "image"), ("i2t", "text"))
            for k in (1, 5, 10)}


def test_evaluation_decodes_as_the_reference_transform(caption_file, model_dir):
    config = MiniClip.from_pretrained(model_dir).config
    records = read_caption_file(*caption_file)
    ours, reference = image_transform(config), _reference_transform(config)
    for record in records[:5]:
        with Image.open(record.image) as image:
            expected = reference(image)
        torch.testing.assert_close(ours(load_image(record.image)), expected, atol=1e-6, rtol=0)
        # the opt-in reduced decode (--draft_decode) is not the reference's pixels
        assert not torch.allclose(ours(load_image(record.image, draft_size=config.vision_cfg.image_size)), expected,
                                  atol=1e-3)


def test_test_py_and_trainer_equal_clip_benchmark(caption_file, model_dir, tmp_path):
    from miniclip.apps.evaluate import main
    from test_trainer import _args
    from miniclip.training.trainer import ClipTrainer
    model = MiniClip.from_pretrained(model_dir)
    records = read_caption_file(*caption_file)
    reference = _clip_benchmark(model, records)
    assert 0 < reference["t2i_R@10"] < 100 and 0 < reference["i2t_R@10"] < 100  # neither trivial nor saturated

    results = main(["--checkpoint", str(model_dir), "--eval_file", str(caption_file[0]),
                    "--image_root", str(caption_file[1]),
                    "--output_dir", str(tmp_path / "test_py"), "--progress", "false"])["retrieval"]
    trainer = ClipTrainer(model, _args(tmp_path), eval_dataset=records, processing_class=get_tokenizer(model.config))
    in_training = trainer.evaluate()
    for key, value in reference.items():
        assert results[key] == pytest.approx(value, abs=1e-4), f"test.py {key}"
        assert in_training[f"eval_{key}"] == pytest.approx(value, abs=1e-4), f"trainer {key}"
