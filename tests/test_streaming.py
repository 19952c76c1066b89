"""Streamed shards (data/streaming.py, apps/shard.py): shards written by `miniclip.apps.shard` and by hand with the
`webdataset` package read identically, Parquet / save_to_disk sources, bad samples under both policies, and two
real processes (torchrun, gloo) that together see every sample exactly once per pass."""
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from miniclip.apps import train
from miniclip.apps import shard
from miniclip.config import load_model_config
from miniclip.data.captions import read_caption_file
from miniclip.data.dataset import build_dataset
from miniclip.data.streaming import build_stream, stream_source
from miniclip.transforms import ImageDecodeError
from processes import free_port, sigkill_once_written

REPO = Path(__file__).resolve().parent.parent
CONFIG = load_model_config("tiny-vit")


def make_jpeg_set(root: Path, n: int = 12, captions_per_image: int = 1) -> Path:
    """n JPEGs of different sizes (some larger than the model's 64 px, so draft decoding and resizing happen) and a
    tutorial-format caption file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        size = (80 + 9 * i, 70 + 5 * i)
        image = Image.new("RGB", size, ((40 * i) % 256, 120, 255 - (20 * i) % 256))
        image.paste((255, 255, 255), (i * 3, i * 2, i * 3 + 20, i * 2 + 20))
        image.save(root / "images" / f"{i}.jpg", quality=90)
        entries.append({"image": f"images/{i}.jpg",
                        "caption": [f"photo {i} caption {j}" for j in range(captions_per_image)]})
    path = root / "captions.json"
    path.write_text(json.dumps(entries))
    return path


def write_by_hand(caption_file: Path, folder: Path, shard_size: int) -> None:
    """img2dataset's layout through webdataset's own writer: {key}.jpg (the file's bytes), {key}.txt, {key}.json."""
    folder.mkdir(parents=True)
    records = read_caption_file(caption_file)
    for start in range(0, len(records), shard_size):
        with wds.TarWriter(str(folder / f"shard-{start // shard_size:05d}.tar")) as sink:
            for index in range(start, min(start + shard_size, len(records))):
                key = f"{index:09d}"
                sink.write({"__key__": key, "jpg": records[index].image.read_bytes(),
                            "txt": records[index].captions[0], "json": {"key": key, "caption": records[index].captions[0]}})


def items(source, **kwargs) -> list[dict]:
    stream = build_stream(source, CONFIG, train=False, shuffle_buffer=0, **kwargs)
    return list(stream)


def assert_same_items(got: list[dict], expected: list[dict]) -> None:
    assert [g["key"] for g in got] == [e["key"] for e in expected]
    assert [g["caption"] for g in got] == [e["caption"] for e in expected]
    for g, e in zip(got, expected):
        assert torch.equal(g["pixel_values"], e["pixel_values"]), g["key"]


def test_shards_from_miniclip_shard_and_from_webdataset_read_identically(tmp_path):
    caption_file = make_jpeg_set(tmp_path)
    shard.main([str(caption_file), str(tmp_path / "ours"), "--shard_size", "5"])
    write_by_hand(caption_file, tmp_path / "hand", shard_size=5)
    index = json.loads((tmp_path / "ours" / "index.json").read_text())
    assert index["shards"] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"] and index["samples"] == 12
    ours = items(str(tmp_path / "ours" / index["pattern"]))
    hand = items(str(tmp_path / "hand" / "shard-{00000..00002}.tar"))
    assert len(ours) == 12
    assert_same_items(ours, hand)
    # and both equal the map-style path on the caption file itself (same decode, same transform)
    reference = build_dataset(read_caption_file(caption_file), CONFIG, train=False)
    by_key = {item["key"]: item for item in ours}
    for i in range(12):
        assert torch.equal(by_key[f"{i:09d}"]["pixel_values"], reference[i]["pixel_values"])
        assert by_key[f"{i:09d}"]["caption"] == reference[i]["caption"]


def test_shard_cli_resizes_keeps_all_captions_and_writes_parquet(tmp_path):
    caption_file = make_jpeg_set(tmp_path, n=6, captions_per_image=3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "miniclip.apps.shard", str(caption_file), str(tmp_path / "tars"),
                          "--shard_size", "4", "--image_size", "64"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with wds.WebDataset(str(tmp_path / "tars" / "shard-{00000..00001}.tar"), shardshuffle=False) as reader:
        samples = list(reader)
    assert len(samples) == 6
    for sample in samples:
        assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 64  # shorter side resized
        meta = json.loads(sample["json"])
        assert len(meta["captions"]) == 3 and sample["txt"].decode() == meta["captions"][0]
    # caption_mode random draws among all three captions over passes
    stream = build_stream(str(tmp_path / "tars"), CONFIG, shuffle_buffer=0)
    seen = set()
    for epoch in range(6):
        stream.set_epoch(epoch)
        seen |= {item["caption"] for item in stream}
    assert len(seen) > 6
    shard.main([str(caption_file), str(tmp_path / "pq"), "--shard_size", "4", "--image_size", "64",
                "--format", "parquet"])
    assert_same_items(items(str(tmp_path / "pq")), items(str(tmp_path / "tars")))
    with pytest.raises(ValueError, match="already holds"):
        shard.main([str(caption_file), str(tmp_path / "pq"), "--format", "parquet"])


def test_shards_have_no_pax_headers_and_are_byte_identical_for_the_same_input(tmp_path):
    """Whole-second member times: no PAX header per member (half the headers a reader parses), and two runs over
    the same caption file write the same bytes."""
    import tarfile
    caption_file = make_jpeg_set(tmp_path, n=5)
    for name in ("a", "b"):
        shard.main([str(caption_file), str(tmp_path / name), "--shard_size", "3"])
    for shard_file in sorted((tmp_path / "a").glob("*.tar")):
        assert shard_file.read_bytes() == (tmp_path / "b" / shard_file.name).read_bytes(), shard_file.name
        with tarfile.open(shard_file) as tar:
            members = tar.getmembers()
        assert members and all(not m.pax_headers for m in members), [m.pax_headers for m in members]
        assert {m.mtime for m in members} == {int(caption_file.stat().st_mtime)}


def test_parquet_with_image_bytes_and_save_to_disk_folder(tmp_path):
    caption_file = make_jpeg_set(tmp_path, n=6)
    records = read_caption_file(caption_file)
    table = pa.table({"image": [r.image.read_bytes() for r in records], "caption": [r.captions[0] for r in records],
                      "key": [f"{i:09d}" for i in range(6)]})
    pq.write_table(table, tmp_path / "pairs.parquet")  # plain binary column, as pandas / pyarrow users write it
    write_by_hand(caption_file, tmp_path / "tars", shard_size=6)
    expected = items(str(tmp_path / "tars" / "shard-00000.tar"))
    assert_same_items(items(str(tmp_path / "pairs.parquet")), expected)
    on_disk = datasets.Dataset.from_dict(
        {"image": [{"bytes": r.image.read_bytes(), "path": None} for r in records],
         "text": [r.captions[0] for r in records], "key": [f"{i:09d}" for i in range(6)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "key": datasets.Value("string")}))
    on_disk.save_to_disk(str(tmp_path / "disk"))
    assert stream_source(tmp_path / "disk") == ("disk", [str(tmp_path / "disk")])
    assert_same_items(items(str(tmp_path / "disk")), expected)


def test_bad_samples_error_names_shard_and_key_or_are_skipped_and_counted(tmp_path, caplog):
    caption_file = make_jpeg_set(tmp_path, n=4)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=4)
    with wds.TarWriter(str(tmp_path / "tars" / "shard-00001.tar")) as sink:
        sink.write({"__key__": "bad000001", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken", "json": {"caption": "b"}})
        sink.write({"__key__": "bad000002", "jpg": (tmp_path / "images" / "0.jpg").read_bytes(), "txt": " ",
                    "json": {"caption": " "}})
    source = str(tmp_path / "tars" / "shard-{00000..00001}.tar")
    with pytest.raises(ImageDecodeError, match=r"shard-00001.tar: sample bad00000[12]"):
        items(source)
    caplog.set_level(logging.WARNING)
    kept = items(source, on_bad="skip")
    assert sorted(i["key"] for i in kept) == [f"{i:09d}" for i in range(4)]
    assert "skipping bad sample bad000001" in caplog.text and "skipping bad sample bad000002" in caplog.text


def test_stream_flags_are_checked_before_anything_runs(tmp_path):
    caption_file = make_jpeg_set(tmp_path, n=2)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=1)
    base = ["--model_config", "tiny-vit", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
            "--report_to", "none"]
    with pytest.raises(ValueError, match="pass --streaming true"):
        train.main([*base, "--train_file", str(tmp_path / "tars"), "--max_steps", "1"])
    with pytest.raises(ValueError, match="needs --max_steps"):
        train.main([*base, "--train_file", str(tmp_path / "tars"), "--streaming", "true"])
    with pytest.raises(ValueError, match="is a caption file"):
        train.main([*base, "--train_file", str(caption_file), "--streaming", "true", "--max_steps", "1"])
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard\(s\) not found, first .*shard-00002.tar"):
        stream_source(str(tmp_path / "tars" / "shard-{00000..00002}.tar"))


PASS_SCRIPT = """
import json, os, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from miniclip.config import load_model_config
from miniclip.data.streaming import build_stream, stream_loader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
args = SimpleNamespace(process_index=rank, world_size=world, dataloader_num_workers=2, dataloader_pin_memory=False,
                       dataloader_persistent_workers=False, dataloader_prefetch_factor=None)
stream = build_stream(sys.argv[1], load_model_config("tiny-vit"), shuffle_buffer=4, seed=3)
loader = stream_loader(stream, 2, lambda batch: [item["key"] for item in batch], args)
passes = []
for epoch in range(2):
    loader.set_epoch(epoch)
    passes.append([key for batch in loader for key in batch])
gathered = [None] * world
dist.all_gather_object(gathered, passes)
if rank == 0:
    json.dump(gathered, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shards", [4, 3])  # 4: whole shards per process; 3: every other sample (datasets' rule)
def test_two_processes_see_every_sample_once_per_pass(tmp_path, shards):
    # 24 samples: each process's two workers end their shards on full batches of 2 (a worker's short last batch is
    # dropped, see stream_loader), so "exactly once" is exact here
    caption_file = make_jpeg_set(tmp_path, n=24)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=24 // shards)
    script = tmp_path / "pass.py"
    script.write_text(PASS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path / "tars"), str(tmp_path / "seen.json")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())  # [rank][pass] -> keys
    everything = sorted(f"{i:09d}" for i in range(24))
    for p in range(2):
        keys = seen[0][p] + seen[1][p]
        assert sorted(keys) == everything, (p, seen)  # each exactly once across the two processes
        assert len(seen[0][p]) == len(seen[1][p]) == 12  # and the same share each
    assert seen[0][0] != seen[0][1]  # reshuffled per pass


# --- exact resume after SIGKILL ---------------------------------------------------------------------------------------
def stream_flags(out, train_file, **overrides) -> list[str]:
    values = {"model_config": "tiny-vit", "output_dir": str(out), "train_file": str(train_file), "streaming": True,
              "shuffle_buffer": 0, "per_device_train_batch_size": 4, "max_steps": 10, "learning_rate": 1e-3,
              "use_cpu": True, "report_to": "none", "save_strategy": "steps", "save_steps": 4, "logging_steps": 1,
              "dataloader_num_workers": 2, "seed": 0, "disable_tqdm": True, **overrides}
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def loader_args(workers: int):
    from types import SimpleNamespace
    return SimpleNamespace(process_index=0, world_size=1, dataloader_num_workers=workers, dataloader_pin_memory=False,
                           dataloader_persistent_workers=False, dataloader_prefetch_factor=None)


@pytest.mark.parametrize("buffer", [0, 8])  # 0: datasets' own state; 8: the pass's rows re-read, undecoded
def test_loader_state_resumes_the_pass_exactly(tmp_path, buffer):
    """Stop after 3 of a pass's 12 batches (2 workers), save the loader state, rebuild everything and load it: the
    rest of the pass (keys, captions, pixels) is what the uninterrupted loader gave, and the next pass too."""
    from miniclip.data.streaming import StreamLoader, stream_loader
    caption_file = make_jpeg_set(tmp_path, n=24, captions_per_image=3)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=6)

    def loader() -> StreamLoader:
        stream = build_stream(str(tmp_path / "tars"), CONFIG, shuffle_buffer=buffer, seed=5)
        return stream_loader(stream, 2, lambda batch: batch, loader_args(2))

    reference = loader()
    reference.set_epoch(1)
    batches = iter(reference)
    seen = [next(batches) for _ in range(3)]
    state = json.loads(json.dumps(reference.state_dict()))  # as stream_state.json holds it
    rest = list(batches)
    reference.set_epoch(2)
    rest += list(reference)
    resumed = loader()
    resumed.load_state_dict(state)
    got = [batch for batch in resumed]
    resumed.set_epoch(1)  # the Trainer's next pass, offset by the restored one
    got += list(resumed)
    assert len(seen) + len(rest) == 2 * 12  # two whole passes of 12 batches of 2
    assert_same_items([i for b in got for i in b], [i for b in rest for i in b])
    if buffer:  # the buffer really reorders samples across the shard boundaries
        keys = [item["key"] for batch in seen + rest[:3] for item in batch]
        assert keys != sorted(keys, key=lambda k: (int(k) // 6, int(k)))


def test_streamed_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    """24 samples in 4 shards, 2 workers, batch 4, a shuffle buffer of 8: a pass is 6 steps, so the 10 steps cross
    into a second pass and the resumed run must restore the position in the pass, the buffer's content and the pass
    number (its shard order)."""
    from safetensors.torch import load_file
    caption_file = make_jpeg_set(tmp_path, n=24)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=6)
    flags = {"shuffle_buffer": 8}  # a real buffer: its content is rebuilt by re-reading the pass (see StreamedPairs)
    train.main(stream_flags(tmp_path / "ref", tmp_path / "tars", **flags))  # uninterrupted, in this process
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}  # the reference's threads (conftest)
    command = [sys.executable, str(REPO / "train.py"), *stream_flags(tmp_path / "run", tmp_path / "tars", **flags)]
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    done = tmp_path / "run" / "checkpoint-4" / "stream_state.json"
    sigkill_once_written(killed, done)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    resumed = subprocess.run([*command, "--resume_from_checkpoint", "latest"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stream resumed from" in resumed.stdout + resumed.stderr
    expected, got = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    first = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert max((first[k].double() - got[k].double()).abs().max().item() for k in got) > 1e-4  # training moved them


def test_validation_shards_give_the_recall_of_the_same_caption_file(tmp_path):
    """--validation_file as shards (its samples extracted once to output_dir/eval_images) and --test_file as the
    caption file they were written from: the same images and captions, so the same recall on the final model."""
    caption_file = make_jpeg_set(tmp_path, n=8)
    write_by_hand(caption_file, tmp_path / "tars", shard_size=4)
    result = train.main(stream_flags(tmp_path / "out", tmp_path / "tars", max_steps=2, save_strategy="no",
                                     dataloader_num_workers=0, validation_file=tmp_path / "tars",
                                     test_file=caption_file))
    recalls = {k.split("_", 1)[1]: v for k, v in result.eval_metrics.items() if "R@" in k or "mean_recall" in k}
    assert recalls and all(result.test_metrics[f"test_{k}"] == v for k, v in recalls.items()), (
        result.eval_metrics, result.test_metrics)
    assert len(list((tmp_path / "out" / "eval_images").rglob("*.img"))) == 8
