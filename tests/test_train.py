"""train.py end to end on caption files and images made here: a few steps through main(), arguments files, every
kind of bad sample under both policies, exact resume after SIGKILL, and 2 gloo processes (torchrun) against one
process with the double batch."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import set_seed

from miniclip.apps import train  # what train.py runs
from miniclip.model import MiniClip
from processes import free_port, sigkill_once_written

REPO = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 170, 50), (30, 70, 220), (235, 210, 20), (140, 40, 180), (250, 130, 0)]


def make_caption_set(root: Path, n: int = 8, name: str = "train.json", extra: list | None = None) -> Path:
    """n small images (a colour and a white square at an index-dependent place) and a tutorial-format JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        image = Image.new("RGB", (72, 72), COLORS[i % len(COLORS)])
        image.paste((255, 255, 255), (i * 7 % 56, i * 5 % 56, i * 7 % 56 + 14, i * 5 % 56 + 14))
        image.save(root / "images" / f"{i}.png")
        entries.append({"image": f"images/{i}.png", "caption": [f"colour {i % 6} with a square at {i}",
                                                                f"picture number {i}"]})
    path = root / name
    path.write_text(json.dumps(entries + (extra or [])))
    return path


def _flags(out: Path, **overrides) -> list[str]:
    values = {"model_config": "tiny-vit", "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 2,
              "learning_rate": 1e-3, "use_cpu": True, "report_to": "none", "save_strategy": "no",
              "logging_steps": 1, "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True, **overrides}
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def test_main_trains_a_few_steps_and_saves_a_loadable_model(tmp_path, caplog):
    train_file = make_caption_set(tmp_path)
    caplog.set_level(logging.INFO, logger="miniclip")
    result = train.main(_flags(tmp_path / "out", train_file=train_file, validation_file=train_file,
                               max_steps=3, save_strategy="steps", save_steps=2, unlock_image_step=2,
                               init_logit_scale=2.0, learn_logit_scale=False))
    assert "step 2: image tower unlocked" in caplog.text  # two-stage, through the command line
    assert result.trainer.model.logit_scale.logit_scale.item() == 2.0  # not learnt
    out = result.output_dir
    for name in ("model.safetensors", "model_config.json", "tokenizer_config.json", "loss_curve.png",
                 "checkpoint-2/model.safetensors", "checkpoint-2/optimizer.pt", "eval_results.json"):
        assert (out / name).is_file(), name
    assert result.trainer.state.global_step == 3
    assert {"eval_t2i_R@1", "eval_t2i_R@5", "eval_mean_recall"} <= set(result.eval_metrics)
    loaded = MiniClip.from_pretrained(out)
    trained = result.trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_arguments_file_yaml_and_json(tmp_path):
    train_file = make_caption_set(tmp_path)
    values = {"model_config": "tiny-vit", "train_file": str(train_file), "output_dir": str(tmp_path / "out"),
              "max_steps": 1, "per_device_train_batch_size": 4, "use_cpu": True, "loss": "siglip",
              "caption_mode": "all", "lock_text": True, "image_size": 32, "disable_tqdm": True}
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    result = train.main([str(yaml_file)])
    assert result.trainer.state.global_step == 1 and result.trainer.model.logit_bias is not None
    assert len(result.trainer.train_dataset) == 16  # caption_mode all: 8 images x 2 captions
    assert result.trainer.train_dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert MiniClip.from_pretrained(result.output_dir).config.vision_cfg.image_size == 32
    assert not any(p.requires_grad for p in result.trainer.model.text_encoder.parameters())
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({**values, "loss": "triplet"}))
    with pytest.raises(ValueError, match="loss='triplet' is not one of"):
        train.parse_args([str(json_file)])


def test_no_data_arguments_is_the_default_run():
    model_args, data_args, training_args, default_run = train.parse_args(["--num_train_epochs", "1"])
    assert default_run and data_args.train_file is None and model_args.model_config
    assert training_args.output_dir == "output/default" and training_args.num_train_epochs == 1  # user flag wins
    assert training_args.report_to in ([], ["none"], "none") and training_args.use_cpu


def test_resume_latest_skips_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: killed while being written
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert train.resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert train.resolve_checkpoint("latest", str(tmp_path / "empty")) is None  # a fresh job just starts
    with pytest.raises(FileNotFoundError, match="checkpoint-6"):
        train.resolve_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))


# --- bad samples ------------------------------------------------------------------------------------------------------
BAD = {  # kind -> the bad entry (appended after 8 good ones, so it is entry 8)
    "missing image": {"image": "images/nope.png", "caption": ["a caption"]},
    "empty captions": {"image": "images/0.png", "caption": []},
    "non-list captions": {"image": "images/0.png", "caption": 42},
    "empty caption string": {"image": "images/0.png", "caption": ["  "]},
    "path escaping a confined root": {"image": "../outside.png", "caption": ["a caption"]},
    "corrupt image": {"image": "images/corrupt.png", "caption": ["a caption"]},
}


def _bad_set(root: Path, entries: list) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (8, 8)).save(root.parent / "outside.png")  # exists, but outside the image root
    return make_caption_set(root, extra=entries)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_sample_with_policy_error_names_file_and_entry(tmp_path, kind):
    train_file = _bad_set(tmp_path / "set", [BAD[kind]])
    with pytest.raises(ValueError, match="entry 8") as error:
        train.main(_flags(tmp_path / "out", train_file=train_file, per_device_train_batch_size=9, max_steps=1,
                          confine_to_image_root=True))
    where = "corrupt.png" if kind == "corrupt image" else str(train_file)
    assert where in str(error.value)


def test_bad_samples_with_policy_skip_are_dropped_and_counted(tmp_path, caplog):
    train_file = _bad_set(tmp_path / "set", list(BAD.values()))
    caplog.set_level(logging.WARNING)
    # one batch of all 9 usable rows (8 good + the corrupt image), so the corrupt one is decoded and skipped
    result = train.main(_flags(tmp_path / "out", train_file=train_file, on_bad="skip", confine_to_image_root=True,
                               per_device_train_batch_size=9, max_steps=1))
    assert result.trainer.state.global_step == 1
    assert len(result.trainer.train_dataset) == 9
    log = caplog.text
    for index in range(8, 8 + len(BAD) - 1):  # every entry-level problem, by entry
        assert f"skipping entry {index}" in log
    assert "skipped 5 bad entries of 14" in log
    assert "skipping bad sample" in log and "corrupt.png" in log


@pytest.mark.parametrize("on_bad", ["error", "skip"])
@pytest.mark.parametrize("content,message", [("[{\"image\": ", "is not valid JSON"), ("[]", "no usable samples")])
def test_unusable_caption_file_fails_under_both_policies(tmp_path, on_bad, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        train.main(_flags(tmp_path / "out", train_file=path, on_bad=on_bad))
    assert str(path) in str(error.value)


# --- resume after SIGKILL ---------------------------------------------------------------------------------------------
def _run_script(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:  # a file, not a pipe: nothing blocks on a full pipe buffer
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    train_file = make_caption_set(tmp_path, n=16)
    common = dict(train_file=train_file, max_steps=10, save_strategy="steps", save_steps=3, logging_steps=1)
    train.main(_flags(tmp_path / "ref", **common))  # the uninterrupted reference, in this process
    # killed as soon as the first checkpoint is complete
    killed = _run_script(_flags(tmp_path / "run", **common), tmp_path / "killed.log")
    done = tmp_path / "run" / "checkpoint-3" / "trainer_state.json"
    sigkill_once_written(killed, done)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    resumed = _run_script(_flags(tmp_path / "run", resume_from_checkpoint="latest", **common), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    expected, got = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert expected.keys() == got.keys()
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    # and not vacuous: training moved the weights
    first = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    assert max((first[k].double() - got[k].double()).abs().max().item() for k in got) > 1e-4


# --- two processes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_match_one_process_with_double_batch(tmp_path, loss):
    """torchrun --nproc_per_node 2 (gloo on CPU) with batch B per process vs python train.py with batch 2B.
    The data set is exactly 2B images, so every step's global batch is the whole set in both runs (without
    augmentation), and the gathered negatives must make the two runs identical."""
    batch = 4
    train_file = make_caption_set(tmp_path, n=2 * batch)
    # adam_epsilon 1e-6: some gradients are exactly zero in theory (an attention key bias shifts every score of a
    # row alike) and rounding noise in practice; Adam's default eps 1e-8 would turn that noise into full steps.
    common = dict(train_file=train_file, max_steps=3, augment=False, loss=loss, logging_steps=1, adam_epsilon=1e-6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # torchrun (what `accelerate launch --multi_gpu` runs on GPUs; accelerate's CPU multi-process path needs mpirun)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(free_port()), str(REPO / "train.py"),
              *_flags(tmp_path / "two", per_device_train_batch_size=batch, **common)]
    two = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = train.main(_flags(tmp_path / "one", per_device_train_batch_size=2 * batch, **common))

    def losses(history):
        return [e["loss"] for e in history if "loss" in e and "train_loss" not in e]

    two_history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    assert len(losses(two_history)) == 3
    assert losses(two_history) == pytest.approx(losses(one.trainer.state.log_history), abs=1e-5)
    expected = load_file(tmp_path / "one" / "model.safetensors")
    got = load_file(tmp_path / "two" / "model.safetensors")
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-5, worst
    set_seed(0)  # main() seeds, then builds the model: the same initial weights
    initial = MiniClip(one.trainer.model.config).state_dict()
    assert max((initial[k] - got[k]).abs().max().item() for k in got) > 1e-4  # training moved them


def test_context_length_from_scratch_and_pretrained(tmp_path):
    """--context_length sets the text tower's positions (from scratch) or truncates a checkpoint's (finetune)."""
    train_file = make_caption_set(tmp_path)
    scratch = train.main(_flags(tmp_path / "scratch", train_file=train_file, context_length=12))
    model = MiniClip.from_pretrained(scratch.output_dir)
    assert model.config.text_cfg.context_length == 12
    assert model.text_encoder.positional_embedding.shape[0] == 12
    flags = _flags(tmp_path / "ft", train_file=train_file, pretrained=scratch.output_dir, context_length=8)
    del flags[:2]  # no --model_config: the checkpoint's own architecture
    finetuned = train.main(flags)
    shorter = MiniClip.from_pretrained(finetuned.output_dir)
    assert shorter.config.text_cfg.context_length == 8
    assert shorter.text_encoder.positional_embedding.shape[0] == 8
