"""bench/e2e_speed.py: open_clip's CSV gives each image the caption miniclip's own dataset picks in that pass (read
back with open_clip_train's CsvDataset), and both command lines, read by each tool's own parser, carry the same
hyper-parameters."""
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from miniclip.data.captions import CaptionRecord
from miniclip.data.dataset import ClipDataset

sys.path.insert(0, str(REPO))
from bench import e2e_speed  # noqa: E402

CAPTIONS = [("a dog", "a brown dog runs", 'a "quoted" dog', "dog\twith a tab", "the dog"),
            ("one cat",), ("red car", "a car"), ("x", "y", "z")]


def _records(tmp_path) -> list[CaptionRecord]:
    records = []
    for i, captions in enumerate(CAPTIONS):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        records.append(CaptionRecord(tmp_path / f"{i}.png", captions))
    return records


def test_csv_has_one_row_per_image_per_pass_with_miniclips_caption(tmp_path):
    from open_clip_train.data import CsvDataset
    records, seed = _records(tmp_path), 7
    rows = e2e_speed.csv_rows(records, seed, n_samples=10)  # 2 whole passes of 4 images + 2 rows of a third
    e2e_speed.write_csv(rows, tmp_path / "train.csv")
    read = CsvDataset(str(tmp_path / "train.csv"), transforms=lambda image: Path(image.filename).name,
                      img_key="filepath", caption_key="title", sep="\t", tokenizer=lambda texts: texts)
    assert [read[i] for i in range(len(read))] == [(Path(p).name, c) for p, c in rows]  # as open_clip reads it
    dataset = ClipDataset(records, transform=lambda image: torch.zeros(1), caption_mode="random", seed=seed)
    for p in range(2):
        dataset.set_epoch(p)
        assert rows[4 * p:4 * p + 4] == [(str(r.image), dataset[i]["caption"]) for i, r in enumerate(records)]
    dataset.set_epoch(2)
    last = rows[8:]
    assert len(set(last)) == 2 and all((path, caption) == (str(records[i].image), dataset[i]["caption"])
                                       for path, caption in last for i in [int(Path(path).stem)])
    assert sorted(Counter(Path(p).stem for p, _ in rows).values()) == [2, 2, 3, 3]  # two of them a third time
    assert rows[1][1] == "one cat" and rows[5][1] == "one cat"  # a single caption is always that caption


def test_both_command_lines_carry_the_same_settings(tmp_path):
    from open_clip_train.params import parse_args as open_clip_args
    from miniclip.training.arguments import parse_args as miniclip_args
    args = types.SimpleNamespace(data="/data", batch=32, lr=3e-3, warmup=7, beta1=0.8, beta2=0.97, eps=1e-7, wd=0.05,
                                 clip=0.5, workers=1, threads=1)
    config = REPO / "model_configs" / "tiny-vit.json"
    mc = miniclip_args(e2e_speed.miniclip_command(config, args, 5, 40, 128, tmp_path / "mc")[2:])
    oc_argv = e2e_speed.open_clip_command(config, args, 5, tmp_path / "t.csv", tmp_path / "logs")
    assert oc_argv[3] == str(config) and "--force-quick-gelu" not in oc_argv  # tiny-vit is GELU
    oc = open_clip_args(oc_argv[4:])
    model, data, train, _ = mc
    assert (train.per_device_train_batch_size, train.learning_rate, train.warmup_steps, train.adam_beta1,
            train.adam_beta2, train.adam_epsilon, train.weight_decay, train.max_grad_norm, train.seed,
            train.dataloader_num_workers, train.max_steps) == \
        (oc.batch_size, oc.lr, oc.warmup, oc.beta1, oc.beta2, oc.eps, oc.wd, oc.grad_clip_norm, oc.seed, oc.workers,
         40) == (32, 3e-3, 7, 0.8, 0.97, 1e-7, 0.05, 0.5, 5, 1, 40)
    assert train.bf16 and train.use_cpu and oc.precision == "amp_bf16" and oc.device == "cpu"
    assert train.lr_scheduler_type == "cosine" and oc.lr_scheduler == "cosine" and oc.epochs == 1
    assert data.caption_mode == "random" and data.augment and data.max_train_samples == 128
    assert model.model_config == str(config) and oc.model == "tiny-vit"
    assert (oc.csv_separator, oc.csv_img_key, oc.csv_caption_key, oc.dataset_type) == ("\t", "filepath", "title", "csv")
    assert train.eval_strategy == "no" and oc.val_data is None


@pytest.mark.parametrize("size", list(e2e_speed.SIZES))
def test_size_configs_build_in_open_clip(size):
    """Each size's config is one open_clip_train can build (what --model resolves to after add_model_config)."""
    import open_clip
    config = e2e_speed.SIZES[size][0]
    open_clip.add_model_config(str(config))
    assert open_clip.get_model_config(config.stem)["vision_cfg"]["image_size"] in (64, 224)
