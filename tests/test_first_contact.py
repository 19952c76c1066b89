"""What a new user runs into first: a config name given as a checkpoint, --pretrained without data, --bf16 / --fp16
on a CPU-only machine, and mistakes (bad file, flag, checkpoint) answered by one `error:` line and exit status 2 from
train.py, test.py and the demo, while a real bug keeps its traceback."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from miniclip.apps import ablate, demo, evaluate, train
from miniclip.apps.cli import run_cli
from miniclip.checkpoints.hub import KNOWN, checkpoints_for_config, resolve
from miniclip.config import list_model_configs
from miniclip.training.arguments import parse_args

REPO = Path(__file__).resolve().parent.parent
CPU_ONLY = not torch.cuda.is_available() and not torch.backends.mps.is_available()


def caption_set(root: Path, n: int = 4) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (60 * i, 200 - 40 * i, 90)).save(root / "images" / f"{i}.png")
    path = root / "train.json"
    path.write_text(json.dumps([{"image": f"images/{i}.png", "caption": [f"colour {i}"]} for i in range(n)]))
    return path


def flags(out: Path, **values) -> list[str]:
    values = {"model_config": "tiny-vit", "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 2,
              "report_to": "none", "save_strategy": "no", "dataloader_num_workers": 0, "disable_tqdm": True,
              **values}
    return [item for k, v in values.items() if v is not None for item in (f"--{k}", str(v))]


# --- item 5: known checkpoint names -----------------------------------------------------------------------------------
def test_config_name_as_checkpoint_names_the_known_checkpoints():
    with pytest.raises(FileNotFoundError, match=r"'TinyCLIP-ViT-8M-16-Text-3M' is a model config .* known "
                                                r"checkpoint\(s\) for it: TinyCLIP-ViT-8M-16-Text-3M-YFCC15M\."):
        resolve("TinyCLIP-ViT-8M-16-Text-3M")
    with pytest.raises(FileNotFoundError, match="'tiny-vit' is a model config .* no known published checkpoint"):
        resolve("tiny-vit")
    # every shipped config that has published weights finds them; every answer is a known name
    with_weights = {name: checkpoints_for_config(name) for name in list_model_configs()}
    assert with_weights["TinyCLIP-ResNet-19M-Text-19M"] == ["TinyCLIP-ResNet-19M-Text-19M-LAION400M"]
    assert with_weights["OpenAI-ViT-B-32"] == ["OpenAI-ViT-B-32"]
    assert all(set(names) <= set(KNOWN) for names in with_weights.values())
    assert sum(bool(names) for names in with_weights.values()) == 11  # 6 TinyCLIP, 3 OpenAI, 2 Chinese-CLIP


def test_hub_folder_is_the_checkouts_model_hub(monkeypatch):
    from miniclip.checkpoints.hub import hub_dir
    monkeypatch.delenv("MINICLIP_HUB_DIR", raising=False)
    assert hub_dir() == REPO / "model_hub"  # git-ignored, next to the code (an installed wheel: the cache)


def test_train_py_with_a_config_name_as_pretrained(tmp_path, capsys):
    train_file = caption_set(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        train.cli(flags(tmp_path / "out", model_config=None, pretrained="TinyCLIP-ViT-8M-16-Text-3M",
                        train_file=train_file, use_cpu=True))
    assert exit_.value.code == 2
    assert "known checkpoint(s) for it: TinyCLIP-ViT-8M-16-Text-3M-YFCC15M" in capsys.readouterr().err


def test_pretrained_without_train_file_is_an_error_not_the_default_run(tmp_path, capsys):
    model_args, data_args, training_args, default_run = parse_args(["--pretrained", "x.pt", "--output_dir",
                                                                    str(tmp_path)])
    assert not default_run and model_args.model_config is None  # nothing of the default run merged in
    assert training_args.num_train_epochs == 3.0  # transformers' default, not DEFAULT_RUN's 20
    with pytest.raises(SystemExit) as exit_:
        train.cli(["--pretrained", "x.pt", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "train.py: error: --pretrained needs --train_file" in capsys.readouterr().err


def test_arguments_file_then_flags(tmp_path):
    """`python train.py args.yaml --resume_from_checkpoint latest` (the README): the flags override the file."""
    args_file = tmp_path / "args.yaml"
    args_file.write_text("model_config: tiny-vit\ntrain_file: data/train.json\nmax_steps: 7\nlearning_rate: 0.01\n"
                         f"output_dir: {tmp_path}\n")
    model_args, data_args, training_args, default_run = parse_args([str(args_file), "--resume_from_checkpoint",
                                                                    "latest", "--max_steps", "3"])
    assert not default_run and model_args.model_config == "tiny-vit" and data_args.train_file == "data/train.json"
    assert (training_args.max_steps, training_args.learning_rate, training_args.resume_from_checkpoint) == \
        (3, 0.01, "latest")
    args_file.write_text("learning_rate: 0.5\n")  # no data: the default run, the file on top of it, flags on top
    model_args, _, training_args, default_run = parse_args([str(args_file), "--max_steps", "3"])
    assert default_run and model_args.model_config == "tiny-default" and training_args.learning_rate == 0.5
    args_file.write_text("learning_rat: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rat'\]"):
        parse_args([str(args_file), "--max_steps", "3"])


# --- item 6: mixed precision without a GPU --------------------------------------------------------------------------
@pytest.mark.skipif(not CPU_ONLY, reason="checks the CPU-only fallback; this machine has a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_flag_without_gpu_trains_on_the_cpu(tmp_path, caplog, precision):
    train_file = caption_set(tmp_path)
    caplog.set_level(logging.WARNING, logger="miniclip")
    argv = flags(tmp_path / "out", train_file=train_file, **{precision: "true"})  # no --use_cpu
    _, _, training_args, _ = parse_args(argv)
    assert training_args.use_cpu and training_args.bf16 and not training_args.fp16  # fp16 on a CPU would be fp32
    assert f"--{precision} without a GPU: training on the CPU" in caplog.text
    result = train.main(argv)
    assert result.trainer.state.global_step == 2 and result.trainer.args.device.type == "cpu"


# --- item 10: one-line errors, exit 2 -------------------------------------------------------------------------------
def _bad_cases(tmp_path: Path) -> list:
    train_file = caption_set(tmp_path / "data")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "out"
    return [
        (train.cli, flags(out, train_file=tmp_path / "nope.json"), "caption file not found"),
        (train.cli, flags(out, train_file=train_file, loss="hinge"), "invalid choice: 'hinge'"),  # argparse's
        (train.cli, flags(out, train_file=train_file, lock_image_unlocked_groups=-1), "must be >= 0"),
        (train.cli, flags(out, train_file=train_file, model_config="tiny-vitt"), "unknown model config 'tiny-vitt'"),
        (train.cli, flags(out, train_file=train_file, model_config=None, pretrained=garbage), "garbage.pt"),
        (train.cli, flags(out, train_file=train_file, resume_from_checkpoint=tmp_path), "not a complete checkpoint"),
        (evaluate.cli, ["--checkpoint", str(garbage), "--image", "x.png", "--texts", "a"], "garbage.pt"),
        (evaluate.cli, ["--model_config", "tiny-vit", "--eval_file", str(tmp_path / "nope.json")], "not found"),
        (demo.cli, ["--checkpoint", str(garbage), "--data", str(train_file)], "garbage.pt"),
        (demo.cli, ["--checkpoint", str(tmp_path / "none"), "--data", str(train_file)], "none"),
        (ablate.cli, [str(tmp_path / "grid.yaml")], "grid.yaml"),
    ]


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("gradio")  # the demo imports it before reading anything
    for cli, argv, message in _bad_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2, (argv, err)
        assert err and ": error: " in err[-1] and message in err[-1], (argv, err)


def test_scripts_print_no_traceback(tmp_path):
    """As a user sees it: the real entry points in subprocesses, stderr is the one error line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cases = [([REPO / "train.py", *flags(tmp_path / "o", train_file=tmp_path / "nope.json")],
              "train.py: error: caption file not found"),
             ([REPO / "test.py", "--checkpoint", tmp_path / "missing", "--image", "x.png", "--texts", "a"],
              "test.py: error:")]
    for argv, message in cases:
        run = subprocess.run([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and message in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]


def test_real_bugs_keep_their_traceback(monkeypatch, capsys):
    def buggy(argv):
        raise RuntimeError("shape mismatch in a matmul")  # not a user error

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli(buggy, [], prog="train.py")

    def user_error(argv):
        raise ValueError("bad value")

    monkeypatch.setenv("MINICLIP_DEBUG", "1")  # for bug reports: the traceback of a user error too
    with pytest.raises(ValueError, match="bad value"):
        run_cli(user_error, [], prog="train.py")
