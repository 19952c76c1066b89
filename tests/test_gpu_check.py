"""bench/gpu_check.sh and its helpers on a CPU machine: the no-GPU path (one line, exit 0), usage errors (exit 2),
the datasheet peaks, the training table's MFU arithmetic with a failed peer, and the targets summary."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench import gpu_report, train_speed  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(*args, **env):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this is the no-GPU path on every machine
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("args", [["--dry-run"], ["--out", "elsewhere", "wheels"]])
def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(args):
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU (torch ") and "nothing run" in lines[0]
    assert not (REPO / "elsewhere").exists()  # nothing written


def test_without_pytorch_the_script_says_so_in_one_line():
    proc = _run("--dry-run", PYTHON="/nonexistent/python")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["gpu_check: no CUDA GPU: PyTorch is not importable with /nonexistent/python; "
                                        "nothing run"]


def test_unknown_option_is_a_usage_error():
    proc = _run("--fast")
    assert proc.returncode == 2
    assert "unknown option --fast" in proc.stderr and "--download-wheels" in proc.stdout


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA L40", None), ("Tesla T4", None),
])
def test_datasheet_peaks(name, tflops):
    found = train_speed.datasheet_peak(name)
    assert (found[0] if found else None) == tflops


def _measured():
    return {"results": {("miniclip", "bf16"): [{"samples_per_s": 1000.0, "peak_mb": 30000.0, "warmup_s": 2.0,
                                                "gflop_per_sample": 120.0}],
                        ("open_clip", "bf16"): [{"samples_per_s": 800.0, "peak_mb": 40000.0, "warmup_s": 3.0,
                                                 "gflop_per_sample": 150.0}],
                        ("transformers", "bf16"): [{"error": "torch.OutOfMemoryError: CUDA out of memory."}]},
            "peaks": {"bf16": 240e12}, "device_name": "NVIDIA H200"}


def _args():
    return argparse.Namespace(device="cuda", batch=256, config="OpenAI-ViT-B-16", reps=1, steps=10, threads=4)


def test_training_summary_mfu_and_ratios_by_hand():
    rows = {r["impl"]: r for r in train_speed.summary(_measured(), _args())}
    ours, theirs, failed = rows["miniclip"], rows["open_clip"], rows["transformers"]
    assert ours["mfu_measured"] == pytest.approx(50.0)  # 1000 /s * 120 GFLOP = 120 TFLOP/s of 240
    assert ours["mfu_datasheet"] == pytest.approx(100 * 120 / 989)
    assert theirs["mfu_measured"] == pytest.approx(50.0)  # 800 * 150 = 120 TFLOP/s: its own (77-token) FLOPs
    assert theirs["speedup"] == pytest.approx(1.25) and theirs["memory_ratio"] == pytest.approx(0.75)
    assert failed["samples_per_s"] is None and "OutOfMemoryError" in failed["error"]
    text = train_speed.table(_measured(), _args())
    assert "failed: torch.OutOfMemoryError" in text and "(H200 SXM): 989 TFLOP/s" in text and "1.25x" in text


def test_report_checks_the_targets(tmp_path):
    rows = train_speed.summary(_measured(), _args())
    (tmp_path / "train_vit_b_16.json").write_text(json.dumps(rows))
    (tmp_path / "gpu_busy.json").write_text(json.dumps({
        "config": "TinyCLIP-ViT-40M-32-Text-19M", "batch": 256, "workers": 14, "gpu_busy_pct": 87.5,
        "peak_mb": 12000.0}))
    text = gpu_report.report(tmp_path)
    assert "| ViT-B/16 bf16 training MFU (measured matmul peak) | >= 45 % | 50.0 (datasheet peak: 12.1) | met |" in text
    assert "| ViT-B/16 bf16 samples/s, miniclip / open_clip | >= 1.20x | 1.25 | met |" in text
    assert "| TinyCLIP-40M train.py, GPU busy (14 workers) | >= 90 % | 87.5 | missed |" in text
    assert "| OpenAI-ViT-B-16 | open_clip | 256 | 40000 |" in text


def _fake_gpu_python(tmp_path, stage_exit: int):
    """An interpreter that reports a GPU to the script's detection line and makes every stage (bench/*.py,
    python -m pytest) exit at once with `stage_exit`; everything else (dependency check, report) is the real one.
    What runs for real is the script's own logic: stage bookkeeping, caps, the report file, the exit status."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -c && $2 == *get_device_name* ]]; then echo "Fake GPU 80GB"; exit 0; fi
if [[ $1 == bench/*_speed.py || $1 == bench/gpu_busy.py || $1 == -m ]]; then echo "stage $1"; exit {stage_exit}; fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return str(fake)


def test_dry_run_with_a_gpu_prints_the_plan_and_runs_nothing(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path / "out"), PYTHON=_fake_gpu_python(tmp_path, 1))
    assert proc.returncode == 0, proc.stderr
    stages = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert stages == ["cuda-tests", "train-vit-b-16", "train-tinyclip-40m", "encode", "train-py-300-steps"]
    caps = [int(line.split("(cap ")[1].split("s)")[0]) for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert sum(caps) <= 480  # issue 18: under 8 minutes in all
    assert "--batch max" in proc.stdout and "--config OpenAI-ViT-B-16 --batch 256" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("dry run: Fake GPU 80GB found")
    assert not (tmp_path / "out" / "RESULTS_GPU.md").exists()


def test_failed_stages_are_reported_in_the_file_and_the_exit_status(tmp_path):
    out = tmp_path / "out"
    proc = _run("--out", str(out), PYTHON=_fake_gpu_python(tmp_path, 3))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = (out / "RESULTS_GPU.md").read_text()
    assert text.startswith("# GPU check, ") and "GPU: Fake GPU 80GB;" in text
    for stage in ("cuda-tests", "train-vit-b-16", "train-tinyclip-40m", "encode", "train-py-300-steps"):
        assert f"| {stage} | failed (exit 3) |" in text
    assert "| >= 45 % | - | - |" in text  # no measurement, no verdict
    assert (out / "logs" / "encode.log").read_text() == "stage bench/encode_speed.py\n"


def test_missing_packages_without_a_wheel_folder_say_how_to_fill_one(tmp_path):
    fake = _fake_gpu_python(tmp_path, 1)
    text = open(fake).read().replace("exec ", 'if [[ $1 == - && $# == 1 ]]; then cat >/dev/null; echo "open_clip ftfy"; '
                                     "exit 0; fi\nexec ", 1)
    open(fake, "w").write(text)  # the dependency check now reports two missing modules
    proc = _run("--out", str(tmp_path / "out"), PYTHON=fake)
    assert proc.returncode == 2
    assert "missing Python packages (open_clip ftfy) and no wheel folder given" in proc.stderr
    assert "bash bench/gpu_check.sh --download-wheels wheels --python-version" in proc.stderr
