"""data/dataset.py: ClipDataset (decode, caption choice, augmentation seeds), ClipCollator, splits, on real image files."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from miniclip.data.captions import CaptionRecord, read_caption_file
from miniclip.config import load_model_config
from miniclip.data.dataset import ClipCollator, ClipDataset, EpochCallback, build_dataset, caption_choice, split_records
from miniclip.tokenizer import get_tokenizer
from miniclip.transforms import ImageDecodeError, image_transform, load_image

CONFIG = load_model_config("tiny-vit")


def _photo(w, h, seed):
    """A smooth image with a few hard edges (closer to a photo than white noise, which no resize preserves)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(x * rng.uniform(2, 8) + rng.uniform(0, 6)) + np.cos(y * rng.uniform(2, 8)) for _ in range(3)]
    image = (np.stack(channels, -1) * 60 + 128).clip(0, 255)
    image[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)  # a flat block with sharp borders
    return Image.fromarray(image.astype(np.uint8))


def _write_set(tmp_path, n=6, captions_per_image=3, size=(80, 60)):
    """n JPEG images and a tutorial-format JSON file; captions are unique so a caption identifies (image, k)."""
    (tmp_path / "images").mkdir(exist_ok=True)
    entries = []
    for i in range(n):
        _photo(*size, seed=i).save(tmp_path / "images" / f"{i}.jpg", quality=95)
        entries.append({"image": f"images/{i}.jpg",
                        "caption": [f"photo {i} caption {k}" + " long" * (i * k) for k in range(captions_per_image)]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    return read_caption_file(path)


def _eval_dataset(records, **kw):
    # The eval transform is deterministic, so pixel_values can be compared across processes.
    return ClipDataset(records, image_transform(CONFIG, train=False), **kw)


# --- collator ---------------------------------------------------------------------------------------------------------
def test_bpe_collator_trims_to_longest_and_keeps_the_text_features():
    tokenizer = get_tokenizer(CONFIG)
    # "!@#$%!" tokenizes with id 0 (the byte "!") inside the caption: the mask must not treat it as padding.
    captions = ["a dog", "two dogs play in the snow near a red fence", "!@#$%!", "猫"]
    features = [{"pixel_values": torch.full((3, 64, 64), float(i)), "caption": c} for i, c in enumerate(captions)]
    batch = ClipCollator(tokenizer)(features)
    full = tokenizer(captions)["input_ids"]  # (4, 77)
    eot = full.argmax(-1)
    length = int(eot.max()) + 1
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][2], features[2]["pixel_values"])
    assert batch["input_ids"].shape == (4, length) and length < 77
    assert torch.equal(batch["input_ids"], full[:, :length]) and not full[:, length:].any()
    assert (full[2, 1:eot[2]] == 0).any()  # the tricky caption really has an inner 0
    expected_mask = torch.stack([(torch.arange(length) <= e).long() for e in eot])
    assert torch.equal(batch["attention_mask"], expected_mask)
    # Trimming is exact for the causal tower: same features as the full 77-token context.
    from miniclip.model import MiniClip
    torch.manual_seed(0)
    model = MiniClip(CONFIG).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(batch["input_ids"], batch["attention_mask"]),
                                   model.encode_text(full), rtol=1e-5, atol=1e-5)


def test_bert_collator_trims_with_the_attention_mask():
    config = load_model_config("tiny-chinese-vit")
    tokenizer = get_tokenizer(config)
    captions = ["在雪地中奔跑的狗。", "狗", "两只棕色的狗在雪地里玩耍,后面有一道红色的栅栏"]
    batch = ClipCollator(tokenizer)([{"pixel_values": torch.zeros(3, 64, 64), "caption": c} for c in captions])
    full = tokenizer(captions)
    length = int(full["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape == (3, length) == batch["attention_mask"].shape
    assert torch.equal(batch["input_ids"], full["input_ids"][:, :length])
    assert torch.equal(batch["attention_mask"], full["attention_mask"][:, :length])
    assert not full["input_ids"][:, length:].any()  # only [PAD] (id 0) was dropped


def test_collator_explains_a_missing_caption_column():
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        ClipCollator(get_tokenizer(CONFIG))([{"pixel_values": torch.zeros(3, 64, 64)}])


# --- caption modes ----------------------------------------------------------------------------------------------------
def test_random_caption_is_deterministic_and_changes_with_epoch(tmp_path):
    records = _write_set(tmp_path, n=8, captions_per_image=4)
    a, b = _eval_dataset(records, seed=3), _eval_dataset(records, seed=3)
    assert len(a) == 8
    epoch0 = [a[i]["caption"] for i in range(8)]
    assert epoch0 == [b[i]["caption"] for i in range(8)]  # a second instance (a resumed run) picks the same
    for i, caption in enumerate(epoch0):
        assert caption == records[i].captions[caption_choice(3, 0, i, 4)]
    a.set_epoch(1)
    assert a.epoch == 1 and [a[i]["caption"] for i in range(8)] != epoch0
    b.set_epoch(1)
    assert [a[i]["caption"] for i in range(8)] == [b[i]["caption"] for i in range(8)]
    assert [_eval_dataset(records, seed=4)[i]["caption"] for i in range(8)] != epoch0
    # Over epochs every caption gets its turn.
    seen = {caption_choice(3, epoch, 0, 4) for epoch in range(40)}
    assert seen == {0, 1, 2, 3}


def test_all_mode_makes_every_caption_a_pair(tmp_path):
    records = _write_set(tmp_path, n=5, captions_per_image=3)
    dataset = _eval_dataset(records, caption_mode="all")
    assert len(dataset) == 15
    items = [dataset[i] for i in range(len(dataset))]
    assert [x["caption"] for x in items] == [c for r in records for c in r.captions]
    torch.testing.assert_close(items[3]["pixel_values"], items[5]["pixel_values"])  # same image, other caption
    dataset.set_epoch(7)
    assert [dataset[i]["caption"] for i in range(15)] == [x["caption"] for x in items]


def test_build_dataset_options(tmp_path):
    records = _write_set(tmp_path, n=6)
    dataset = build_dataset(records, CONFIG, max_samples=4, caption_mode="all")
    assert len(dataset) == 12 and dataset[0]["pixel_values"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match=r"caption_mode='each'.*\['random', 'all'\]"):
        build_dataset(records, CONFIG, caption_mode="each")
    with pytest.raises(ValueError, match=r"on_bad='ignore'.*\['error', 'skip'\]"):
        build_dataset(records, CONFIG, on_bad="ignore")
    with pytest.raises(ValueError, match="max_samples=0"):
        build_dataset(records, CONFIG, max_samples=0)


# --- workers ----------------------------------------------------------------------------------------------------------
def _epochs(dataset, epochs=2, **loader_kw):
    loader = DataLoader(dataset, batch_size=3, collate_fn=ClipCollator(get_tokenizer(CONFIG)), **loader_kw)
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # what accelerate / EpochCallback do before iter()
        out.append(list(loader))
    return out


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_serve_the_same_items_as_the_main_process(tmp_path, persistent):
    records = _write_set(tmp_path, n=7, captions_per_image=3)
    reference = _epochs(_eval_dataset(records, seed=1))
    with_workers = _epochs(_eval_dataset(records, seed=1), num_workers=2, persistent_workers=persistent)
    assert len(reference) == len(with_workers) == 2
    for epoch_ref, epoch_workers in zip(reference, with_workers):
        for a, b in zip(epoch_ref, epoch_workers, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
            torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*reference))  # epochs differ


def test_trainer_epochs_reach_persistent_workers(tmp_path):
    """Through the real HF Trainer (2 epochs, 2 persistent workers, shuffled): the captions the model sees in each
    epoch are exactly that epoch's choices."""
    from transformers import Trainer, TrainingArguments
    records = _write_set(tmp_path, n=6, captions_per_image=4)
    dataset = _eval_dataset(records, seed=5)
    tokenizer = get_tokenizer(CONFIG)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, pixel_values, input_ids, attention_mask):
            self.seen.append(input_ids)
            return {"loss": (self.weight * pixel_values.mean()) ** 2}

    model = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=2,
                             dataloader_num_workers=2, dataloader_persistent_workers=True, save_strategy="no",
                             report_to=[], remove_unused_columns=False, use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=ClipCollator(tokenizer),
            callbacks=[EpochCallback(dataset)]).train()
    assert len(model.seen) == 6  # 3 batches per epoch
    for epoch in range(2):
        seen = sorted(tuple(row[row > 0].tolist()) for batch in model.seen[3 * epoch: 3 * epoch + 3] for row in batch)
        chosen = [r.captions[caption_choice(5, epoch, i, 4)] for i, r in enumerate(records)]
        expected = sorted(tuple(row[row > 0].tolist()) for row in tokenizer(chosen)["input_ids"])
        assert seen == expected, f"epoch {epoch}"


# --- bad images -------------------------------------------------------------------------------------------------------
def _corrupt(records, index):
    data = records[index].image.read_bytes()
    records[index].image.write_bytes(data[: len(data) // 3])  # truncated JPEG: the header parses, the decode fails
    return records[index].image


def test_corrupt_image_error_names_file_and_entry(tmp_path):
    records = _write_set(tmp_path, n=4)
    bad = _corrupt(records, 2)
    dataset = _eval_dataset(records, on_bad="error")
    assert dataset[1]["pixel_values"].shape == (3, 64, 64)  # found lazily: the others still load
    with pytest.raises(ImageDecodeError, match=rf"entry 2 \(image {bad}\).*skip"):
        dataset[2]
    (tmp_path / "images" / "0.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"entry 0 .*0\.jpg.*UnidentifiedImageError"):
        dataset[0]
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=ClipCollator(get_tokenizer(CONFIG)))
    with pytest.raises(ImageDecodeError, match="entry 0"):  # re-raised from the worker with the same message
        next(iter(loader))


def test_corrupt_image_skip_substitutes_the_next_entry_and_counts(tmp_path, caplog):
    records = _write_set(tmp_path, n=5, captions_per_image=1)
    bad = _corrupt(records, 1)
    _corrupt(records, 4)
    dataset = _eval_dataset(records, on_bad="skip")
    with caplog.at_level(logging.WARNING, logger="miniclip.data.dataset"):
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 5  # batches stay full
    assert [x["caption"] for x in items] == [records[i].captions[0] for i in (0, 2, 2, 3, 0)]  # wraps around
    torch.testing.assert_close(items[1]["pixel_values"], items[2]["pixel_values"])
    assert dataset.skipped == {1, 4}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and str(bad) in messages[0] and "2 skipped" in messages[1]
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=ClipCollator(get_tokenizer(CONFIG)))))
    assert batch["pixel_values"].shape[0] == 5


def test_all_images_bad_is_an_error(tmp_path):
    records = _write_set(tmp_path, n=2)
    for i in range(2):
        _corrupt(records, i)
    with pytest.raises(ImageDecodeError, match="every one of the 2 samples"):
        _eval_dataset(records, on_bad="skip")[0]


# --- decoding ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", ["tiny-vit", "tiny-chinese-vit"])
def test_draft_decode_is_close_to_full_decode(tmp_path, config_name):
    config = load_model_config(config_name)
    path = tmp_path / "big.jpg"
    _photo(640, 480, seed=7).save(path, quality=95)
    drafted, full = load_image(path, draft_size=64), load_image(path)
    assert full.size == (640, 480) and drafted.mode == "RGB"
    assert drafted.size == (160, 120)  # libjpeg scaled by 1/4: the largest reduction keeping both sides >= 64
    transform = image_transform(config, train=False)
    a, b = transform(drafted), transform(full)  # normalised pixels, std about 1
    # Measured: mean |difference| 0.004 (a quarter of a grey level), the largest 0.07 (tiny-vit), on sharp edges.
    assert (a - b).abs().mean() < 0.015 and (a - b).abs().max() < 0.2
    # PNG has no reduced decode: unchanged.
    _photo(640, 480, seed=7).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", draft_size=64).size == (640, 480)


def test_load_image_converts_any_mode_to_rgb(tmp_path):
    _photo(40, 30, seed=1).convert("L").save(tmp_path / "grey.jpg")
    _photo(40, 30, seed=1).convert("RGBA").save(tmp_path / "alpha.png")
    for name in ("grey.jpg", "alpha.png"):
        assert load_image(tmp_path / name, draft_size=64).mode == "RGB"


# --- splitting --------------------------------------------------------------------------------------------------------
def test_split_records_by_image():
    records = [CaptionRecord(image=f"/x/{i}.jpg", captions=(f"c{i}",)) for i in range(20)]
    train, held_out = split_records(records, test_size=0.25, seed=1)
    assert len(train) == 15 and len(held_out) == 5
    assert sorted(r.image for r in train + held_out) == sorted(r.image for r in records)
    assert split_records(records, test_size=0.25, seed=1) == (train, held_out)
    assert split_records(records, test_size=0.25, seed=2)[1] != held_out
    assert len(split_records(records, test_size=3)[1]) == 3
    with pytest.raises(ValueError, match="cannot split 1 record"):
        split_records(records[:1], test_size=0.5)


def test_epoch_callback_reads_the_trainer_state(tmp_path):
    from transformers import TrainerState
    dataset = _eval_dataset(_write_set(tmp_path, n=2))
    for epoch, expected in ((None, 0), (0.0, 0), (1.5, 1), (3.0, 3)):
        EpochCallback(dataset).on_epoch_begin(None, TrainerState(epoch=epoch), None)
        assert dataset.epoch == expected
