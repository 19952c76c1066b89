"""Caption files as other tools write them: the tutorial's JSON with Windows paths, open_clip's tab-separated CSV
(proved by a real `open_clip_train` run on it), transformers' run_clip column names, absolute paths, and rows of one
image grouped into one record in training and in evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from miniclip.apps import train
from miniclip.apps.evaluate import main as evaluate_main
from miniclip.apps.search_index import read_image_set
from miniclip.config import load_model_config
from miniclip.data.captions import CaptionColumns, CaptionFileError, read_caption_file, sniff_separator

REPO = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 170, 50), (30, 70, 220), (235, 210, 20), (140, 40, 180), (250, 130, 0)]


def make_images(folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (72, 72), COLORS[i % len(COLORS)])
        image.paste((255, 255, 255), (i * 9 % 56, i * 5 % 56, i * 9 % 56 + 14, i * 5 % 56 + 14))
        image.save(folder / f"{i}.jpg", quality=95)
        paths.append(folder / f"{i}.jpg")
    return paths


def captions_of(i: int) -> list[str]:
    return [f"colour {i} with a square", f"picture number {i}, a square"]  # commas: a naive comma split breaks


def _flags(out: Path, **overrides) -> list[str]:
    values = {"model_config": "tiny-vit", "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 2,
              "use_cpu": True, "report_to": "none", "save_strategy": "no", "dataloader_num_workers": 0,
              "disable_tqdm": True, **overrides}
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


# --- item 1: the tutorial's JSON, Windows separators ------------------------------------------------------------------
def test_tutorial_json_with_windows_paths_trains(tmp_path):
    paths = make_images(tmp_path / "images", 4)
    # json.dumps writes "images\\0.jpg" in the file: a backslash in the path string, as the tutorial's en_val.json
    entries = [{"image": f"images\\{p.name}", "caption": captions_of(i)} for i, p in enumerate(paths)]
    (tmp_path / "en_val.json").write_text(json.dumps(entries, indent=1))
    assert "images\\\\0.jpg" in (tmp_path / "en_val.json").read_text()
    records = read_caption_file(tmp_path / "en_val.json")
    assert [r.image for r in records] == [p.resolve() for p in paths]
    result = train.main(_flags(tmp_path / "out", train_file=tmp_path / "en_val.json"))
    assert result.trainer.state.global_step == 2


# --- item 2: open_clip's CSV ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_csv(tmp_path_factory) -> Path:
    """A CSV as open_clip_train reads it (pandas, tab-separated, `filepath` / `title`, one row per caption, absolute
    image paths), proved by running `python -m open_clip_train.main` on it for 2 steps with a tiny local model."""
    root = tmp_path_factory.mktemp("open_clip_run")
    paths = make_images(root / "images", 4)
    rows = [{"filepath": str(p.resolve()), "title": c} for i, p in enumerate(paths) for c in captions_of(i)]
    csv_path = root / "train.csv"
    pd.DataFrame(rows).to_csv(csv_path, sep="\t", index=False)
    model_dir = root / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": load_model_config("tiny-vit")
                                                                 .open_clip_cfg()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "open_clip_train.main", "--train-data", str(csv_path),
                          "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
                          "--model", f"local-dir:{model_dir}", "--batch-size", "4", "--epochs", "1",
                          "--workers", "0", "--device", "cpu", "--warmup", "1", "--logs", str(root / "logs"),
                          "--name", "csv-run", "--report-to", "", "--zeroshot-frequency", "0"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (root / "logs" / "csv-run" / "checkpoints" / "epoch_1.pt").is_file()  # open_clip trained on it
    return csv_path


def test_open_clip_csv_is_read_grouped_by_image(open_clip_csv):
    records = read_caption_file(open_clip_csv)
    assert len(records) == 4  # 8 rows, 4 images
    assert [r.captions for r in records] == [tuple(captions_of(i)) for i in range(4)]
    assert all(r.image.is_absolute() and r.image.is_file() for r in records)


def test_open_clip_csv_trains_and_evaluates_like_the_same_json(open_clip_csv, tmp_path, capsys):
    result = train.main(_flags(tmp_path / "out", train_file=open_clip_csv, validation_file=open_clip_csv))
    assert result.trainer.state.global_step == 2
    assert len(result.trainer.train_dataset) == 4  # one pair per image per epoch (caption_mode random)
    # evaluation: 4 retrieval targets, not 8; the same numbers as the same captions in the tutorial's JSON format
    as_json = tmp_path / "same.json"
    as_json.write_text(json.dumps([{"image": str(r.image), "caption": list(r.captions)}
                                   for r in read_caption_file(open_clip_csv)]))
    metrics = [evaluate_main(["--checkpoint", str(result.output_dir), "--eval_file", str(f), "--output_dir",
                              str(tmp_path / f.stem), "--no_progress"])["retrieval"] for f in (open_clip_csv, as_json)]
    assert "4 images, 8 captions" in capsys.readouterr().out
    assert metrics[0] == metrics[1]


def test_separator_is_sniffed_or_given(tmp_path):
    paths = make_images(tmp_path / "images", 2)
    for sep, suffix in ((",", ".csv"), (";", ".csv"), ("\t", ".tsv"), ("|", ".txt.csv")):
        path = tmp_path / f"c{suffix}"
        pd.DataFrame([{"image_path": f"images/{p.name}", "caption": captions_of(i)[1]}
                      for i, p in enumerate(paths)]).to_csv(path, sep=sep, index=False)
        records = read_caption_file(path)
        assert [r.captions for r in records] == [(captions_of(0)[1],), (captions_of(1)[1],)], sep
    assert sniff_separator("filepath\ttitle") == "\t" and sniff_separator("image,caption") == ","
    # given: "\t" typed on a command line arrives as backslash + t
    path = tmp_path / "tab.csv"
    pd.DataFrame([{"filepath": "images/0.jpg", "title": "a, b"}]).to_csv(path, sep="\t", index=False)
    assert read_caption_file(path, csv_separator="\\t")[0].captions == ("a, b",)
    with pytest.raises(CaptionFileError, match="no image path"):
        read_caption_file(path, csv_separator=",")  # a wrong separator: one column named "filepath\ttitle"
    with pytest.raises(CaptionFileError, match="one character"):
        read_caption_file(path, csv_separator="::")


def test_run_clip_column_names(tmp_path):
    """transformers' run_clip: --image_column / --caption_column name the columns of a JSON Lines / CSV file."""
    paths = make_images(tmp_path / "images", 3)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"img": f"images/{p.name}", "sentence": captions_of(i)[0],
                                        "caption": "not this one"}) + "\n" for i, p in enumerate(paths)))
    records = read_caption_file(path, columns=CaptionColumns(image="img", caption="sentence"))
    assert [r.captions for r in records] == [(captions_of(i)[0],) for i in range(3)]
    with pytest.raises(CaptionFileError, match=r"entry 0: no image column 'image'; the entry has \['caption', 'img'"):
        read_caption_file(path, columns=CaptionColumns(image="image"))
    result = train.main(_flags(tmp_path / "out", train_file=path, image_column="img", caption_column="sentence",
                               per_device_train_batch_size=3))
    assert result.trainer.state.global_step == 2


def test_absolute_paths_accepted_unless_confined(tmp_path):
    elsewhere = make_images(tmp_path / "elsewhere", 2)
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "c.json"
    path.write_text(json.dumps([{"image": str(p), "caption": ["x"]} for p in elsewhere]
                               + [{"image": "../elsewhere/0.jpg", "caption": ["again"]}]))
    records = read_caption_file(path)
    assert [r.image for r in records] == elsewhere and records[0].captions == ("x", "again")  # grouped
    with pytest.raises(CaptionFileError, match="entry 0: image path .* is outside the image root"):
        read_caption_file(path, confine_to_root=True)
    with pytest.raises(ValueError, match="outside the image root"):  # the demo serves files: it stays confined
        read_image_set(path)
    inside = tmp_path / "inside.json"  # absolute paths under the served root are fine
    inside.write_text(json.dumps([{"image": str(p), "caption": ["x"]} for p in elsewhere]))
    assert read_image_set(inside).images == elsewhere
