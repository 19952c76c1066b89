"""Every command and snippet in README.md's ```bash / ```python blocks runs here, or is marked as not runnable here.

The convention, for whoever edits the README:
- A bash command is one line (with `\\` continuations; `cmd1 && cmd2` are two commands). Lines starting with `#`
  are prose. A trailing `...` ("more flags") is dropped, and `[--flag value]` (an optional part) is run with the
  brackets removed.
- A command, or a python block, containing `# needs download` (hub weights or data this machine does not have) or
  `# needs gpu` (CUDA, several GPUs) is not run; the test lists what it left out. Nothing else may be left out.
- Set-up commands (`pip`, `python3 -m venv`, `. .venv/bin/activate`, `apt-get`) and the test command itself
  (`python -m pytest`) are what CI runs (.ci/run), not run again here.
- `python train.py ...`, `python test.py ...`, `python -m miniclip.apps.demo ...` (served until its page answers)
  and `python -m miniclip.apps.ablate ...` (with `--dry_run true`) run in a scratch folder that holds tiny stand-ins
  for every file the README names (`data/train.json`, `dog.png`, `args.yaml`, `out/`, `output/default`,
  `../shared/data/...`, `ViT-B-32.pt`, `clip_cn_vit-b-16.pt`, `path/to/...`) and a local model hub
  ($MINICLIP_HUB_DIR) with a tiny model under each known checkpoint name the README uses. Training commands get
  `--max_steps 2` and tiny-batch / CPU flags appended (flags given later win); an arguments file alone is used as
  written (the stand-in `args.yaml` is tiny). A python block runs as a script in a folder of its own that links
  to the same stand-ins.
- Any other command that starts with `python`, `accelerate` or `torchrun` fails the test: make it runnable here
  (add its stand-in files to `scratch` below) or mark it.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from miniclip import MiniClip
from miniclip.checkpoints.hub import HF_FOLDER, KNOWN
from miniclip.config import load_model_config
from processes import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKERS = ("# needs download", "# needs gpu")
TRAIN_FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
               "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false", "--use_cpu", "true",
               "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--eval_strategy", "no",
               "--load_best_model_at_end", "false"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (235, 210, 20)}
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}


# --- reading the README -----------------------------------------------------------------------------------------------
def readme_items(text: str) -> list[tuple[str, str]]:
    """[(kind, source)]: ("bash", one command) or ("python", one block), in README order."""
    items = []
    for lang, code in re.findall(r"^```(bash|python)[ \t]*\n(.*?)^```", text, flags=re.M | re.S):
        if lang == "python":
            items.append(("python", code))
            continue
        for line in code.replace("\\\n", " ").splitlines():
            if not line.strip() or line.strip().startswith("#"):
                continue
            marked = next((m for m in MARKERS if m in line), None)
            for part in re.split(r"\s&&\s", line):
                items.append(("bash", part + (f"  {marked}" if marked and marked not in part else "")))
    return items


def words(command: str) -> list[str]:
    out = []
    for word in shlex.split(command, comments=True):
        if word == "...":
            continue
        out.append(word.strip("[]") if word.startswith("[") or word.endswith("]") else word)
    return out


ITEMS = readme_items(README.read_text(encoding="utf-8"))


def test_readme_has_commands():
    assert sum(kind == "bash" for kind, _ in ITEMS) >= 5 and any(kind == "python" for kind, _ in ITEMS)


# --- the scratch folder -----------------------------------------------------------------------------------------------
def _caption_file(folder: Path, name: str, chinese: bool = False) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (72, 72), rgb)
        image.paste((255, 255, 255), (i * 9, i * 7, i * 9 + 16, i * 7 + 16))
        image.save(folder / "images" / f"{colour}.jpg")
        captions = [f"一张{ZH[colour]}的图片", f"{ZH[colour]}方块"] if chinese else [f"a {colour} square", f"{colour}"]
        entries.append({"image": f"images/{colour}.jpg", "caption": captions})
    (folder / name).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return folder / name


def _cn_clip_checkpoint(path: Path) -> None:
    """A Chinese-CLIP training checkpoint as cn_clip's script saves it: {"state_dict": {"module." + key}}."""
    from conftest import cn_clip_reference
    reference = cn_clip_reference(load_model_config("tiny-chinese-vit"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "step": 1, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               path)


def _openai_archive(path: Path) -> None:
    from test_checkpoints import _config_64, _open_clip_model, make_openai_archive
    make_openai_archive(_open_clip_model(_config_64(resnet=False, quick_gelu=True)), 64, path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    work, shared = root / "work", root / "shared" / "data"
    work.mkdir()
    _caption_file(work / "data", "train.json")
    _caption_file(work / "data", "val.json")
    _caption_file(work, "zh_train.json", chinese=True)
    _caption_file(work, "en_val.json")
    for split in ("en_train.json", "en_val.json", "en_test.json"):
        _caption_file(shared / "flickr8k", split)
    for colour, rgb in COLOURS.items():
        (shared / "cifar10-test" / colour).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (32, 32), tuple(max(0, c - 30 * k) for c in rgb)).save(
                shared / "cifar10-test" / colour / f"{k}.jpg")
    (work / "names.json").write_text(json.dumps({c: f"{c} thing" for c in COLOURS}))
    Image.new("RGB", (80, 60), (160, 110, 60)).save(work / "dog.png")
    (work / "args.yaml").write_text(yaml.safe_dump(
        {"model_config": "tiny-vit", "train_file": "data/train.json", "validation_file": "data/val.json",
         "output_dir": "output/args", "max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "steps",
         "save_steps": 1, "report_to": "none", "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True}))
    torch.manual_seed(0)
    tiny = MiniClip(load_model_config("tiny-vit"))
    for folder in ("out", "output/default"):
        tiny.save_pretrained(work / folder)
    tiny.save_pretrained(work / "path/to/clip-vit-base-patch32", format="hf")
    _cn_clip_checkpoint(work / "clip_cn_vit-b-16.pt")
    _cn_clip_checkpoint(work / "path/to/clip_cn_vit-b-16.pt")
    _openai_archive(work / "ViT-B-32.pt")
    (work / "examples").symlink_to(REPO / "examples")
    hub = root / "hub"
    text = README.read_text(encoding="utf-8")
    for name, source in KNOWN.items():  # a tiny stand-in under every known name the README uses
        if re.search(rf"\b{re.escape(name)}\b(?!-)", text) and source.groups == HF_FOLDER:
            tiny.save_pretrained(hub / name, format="hf")
        elif re.search(rf"\b{re.escape(name)}\b(?!-)", text) and name.startswith("ChineseCLIP"):
            _cn_clip_checkpoint(hub / name / source.groups[0][0])
    return work


def _env(scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MINICLIP_DATA",)}
    return env | {"PYTHONPATH": str(REPO), "MINICLIP_HUB_DIR": str(scratch.parent / "hub"), "HF_HUB_OFFLINE": "1",
                  "MINICLIP_CACHE": str(scratch.parent / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(argv: list, scratch: Path, timeout: int = 600) -> None:
    run = subprocess.run([sys.executable, *map(str, argv)], cwd=scratch, env=_env(scratch), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"{argv}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


def _serve(argv: list[str], scratch: Path) -> None:
    """The demo: started with a free port, passes when its page answers, then stopped."""
    pytest.importorskip("gradio")
    port = free_port()
    argv = [a for i, a in enumerate(argv) if a != "--port" and (i == 0 or argv[i - 1] != "--port")]
    log = open(scratch / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "miniclip.apps.demo", *argv, "--port", str(port)], cwd=scratch,
                            env=_env(scratch), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (scratch / "demo.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError("the demo page did not answer in 240 s:\n" + (scratch / "demo.log").read_text()[-3000:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- running each item ------------------------------------------------------------------------------------------------
def _is_setup(argv: list[str]) -> bool:
    return (argv[0] in ("pip", ".", "source", "apt-get") or argv[:3] in (["python3", "-m", "venv"],
                                                                        ["python", "-m", "pytest"]))


@pytest.mark.parametrize("kind,source", ITEMS, ids=[f"{i}-{s.split(chr(10))[0][:40]}" for i, (_, s) in
                                                    enumerate(ITEMS)])
def test_readme_item(kind, source, scratch):
    marked = next((m for m in MARKERS if m in source), None)
    if marked:
        pytest.skip(f"marked '{marked}'")
    if kind == "python":  # in a folder of its own (links to the stand-ins): what it writes touches no other item
        folder = scratch.parent / f"python-{ITEMS.index((kind, source))}"
        folder.mkdir()
        for entry in scratch.iterdir():
            if entry.name not in ("out", "output"):
                (folder / entry.name).symlink_to(entry)
        (folder / "snippet.py").write_text(source)
        return _run(["snippet.py"], folder)
    argv = words(source)
    if _is_setup(argv):
        pytest.skip("set-up command: CI runs it (.ci/run)")
    if argv[:2] == ["python", "train.py"]:
        args = argv[2:]
        alone = len(args) == 1 and args[0].endswith((".yaml", ".yml", ".json"))
        return _run([REPO / "train.py", *args, *([] if alone else TRAIN_FLAGS)], scratch)
    if argv[:2] == ["python", "test.py"]:
        return _run([REPO / "test.py", *argv[2:], "--no_progress"], scratch)
    if argv[:3] == ["python", "-m", "miniclip.apps.demo"]:
        return _serve(argv[3:], scratch)
    if argv[:3] == ["python", "-m", "miniclip.apps.ablate"]:
        return _run(["-m", "miniclip.apps.ablate", *argv[3:], "--dry_run", "true"], scratch)
    pytest.fail(f"README command not runnable here and not marked ({' or '.join(MARKERS)}): {source.strip()}")
