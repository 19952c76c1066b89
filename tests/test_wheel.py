"""The package is self-contained: a wheel built from this checkout, installed into a fresh virtual environment in a
temporary folder (far from the checkout), lists its model configs, runs 2 steps of the default run and 2 steps of a
Chinese from-scratch run, through the `miniclip-train` console script.

The fresh venv sees this interpreter's site-packages through a `.pth` line (torch & co. are not reinstalled), after
its own, so the wheel's miniclip is the one imported; a `.pth` in a plain path entry is not executed, so an editable
install of the checkout there cannot leak in. The test asserts where miniclip was imported from.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "output", "outputs",
                              "model_hub", ".pytest_cache", ".cache")


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> str:
    run = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, venv bin folder, clean env, work folder) with only the built wheel's miniclip."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"OMP_NUM_THREADS": "1", "MINICLIP_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    source = root / "src"  # a copy: building writes build/ and *.egg-info, which must not touch the checkout
    shutil.copytree(REPO, source, ignore=SKIP, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
          source], cwd=root, env=env)
    wheel = next((root / "dist").glob("miniclip-*.whl"))
    _run([sys.executable, "-m", "venv", root / "venv"], cwd=root, env=env)
    python = root / "venv" / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).strip())
    (site / "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-index", wheel], root, env)
    shutil.rmtree(source)  # nothing of the checkout is left to import from
    work = root / "work"
    work.mkdir()
    return python, root / "venv" / "bin", env, work


def test_wheel_ships_configs_and_vocab(wheel_venv):
    python, _, env, work = wheel_venv
    out = _run([python, "-c", "import json, miniclip, miniclip.tokenizer as t; from miniclip import "
                "list_model_configs; from miniclip.checkpoints.hub import hub_dir; print(json.dumps(["
                "miniclip.__file__, list_model_configs(), str(t.find_bert_vocab()), str(hub_dir())]))"], work, env)
    location, names, vocab, hub = json.loads(out.strip().splitlines()[-1])
    assert Path(hub) == Path(env["MINICLIP_CACHE"]) / "hub"  # downloads go to the cache, not into site-packages
    venv = python.parent.parent
    assert Path(location).is_relative_to(venv) and not Path(location).is_relative_to(REPO), location
    assert Path(vocab).is_relative_to(venv)
    shipped = sorted(p.stem for p in (REPO / "miniclip" / "model_configs").glob("*.json"))
    assert names == shipped and "tiny-default" in names and "TinyCLIP-ViT-8M-16-Text-3M" in names


def test_wheel_default_run_two_steps(wheel_venv):
    python, bin_dir, env, work = wheel_venv
    _run([bin_dir / "miniclip-train", "--max_steps", "2", "--output_dir", work / "default",
          "--dataloader_num_workers", "0", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size",
          "64", "--dataloader_persistent_workers", "false", "--disable_tqdm", "true"], work, env)
    assert (work / "default" / "model.safetensors").is_file()
    state = json.loads((work / "default" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert json.loads((work / "default" / "model_config.json").read_text())["name"] == "tiny-default"


def test_wheel_chinese_from_scratch_two_steps(wheel_venv):
    python, bin_dir, env, work = wheel_venv
    (work / "zh" / "images").mkdir(parents=True)
    entries = []
    for i, (colour, name) in enumerate([((220, 30, 30), "红色"), ((30, 170, 50), "绿色"), ((30, 70, 220), "蓝色"),
                                        ((235, 210, 20), "黄色")]):
        Image.new("RGB", (64, 64), colour).save(work / "zh" / "images" / f"{i}.png")
        entries.append({"image": f"images/{i}.png", "caption": [f"一张{name}的图片", f"{name}的方块"]})
    (work / "zh" / "train.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    _run([bin_dir / "miniclip-train", "--model_config", "tiny-chinese-vit", "--train_file", work / "zh" / "train.json",
          "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", work / "zh-out", "--use_cpu",
          "true", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm",
          "true"], work, env)
    assert (work / "zh-out" / "vocab.txt").is_file() and (work / "zh-out" / "model.safetensors").is_file()
