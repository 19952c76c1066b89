"""Does the data pipeline keep the GPU busy? A real `train.py` run (miniclip.apps.train.main: JPEG decode,
augmentation, tokenization, pinned non-blocking copies, ClipTrainer) on the synthetic caption set rendered at the
model's image size (--images distinct JPEGs, listed again and again so the run is one epoch), timed over its
steady-state steps (after --skip): samples/s, the GPU busy fraction (NVML's utilisation, "percent of time a kernel
was running", sampled by nvidia-smi every 100 ms) and the share of wall time the loop waited for its next batch.

Leaves out on purpose: per-kernel timelines (torch.profiler / Nsight do that) and multi-GPU runs.

    python bench/gpu_busy.py --config TinyCLIP-ViT-40M-32-Text-19M --batch 256 --steps 300 --workers 14
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fmt, machine_line, markdown_table  # noqa: E402


class UtilizationSampler:
    """nvidia-smi's `utilization.gpu` every 100 ms in a background process; `stop()` -> the readings (percent)."""

    def __init__(self):
        self.readings: list[float] = []
        self.proc = None

    @staticmethod
    def gpu_index() -> str:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        return visible or "0"  # an index or a GPU UUID: nvidia-smi -i takes either

    def start(self) -> bool:
        if shutil.which("nvidia-smi") is None:
            return False
        self.proc = subprocess.Popen(["nvidia-smi", "-i", self.gpu_index(), "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return True

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.readings.append(float(line.strip()))
            except ValueError:
                pass

    def stop(self) -> list[float]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return list(self.readings)


def make_window(skip: int, last: int, on_gpu: bool):
    """A TrainerCallback timing steps skip+1 .. last: wall time, time between a step's end and the next step's
    begin (the loop fetching its batch), and NVML readings over the same interval."""
    import torch
    from transformers import TrainerCallback

    class Window(TrainerCallback):
        def __init__(self):
            self.sampler, self.result, self.wait, self.prev_end, self.start = UtilizationSampler(), {}, 0.0, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is not None and self.prev_end is not None:
                self.wait += time.perf_counter() - self.prev_end

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (skip, last) and on_gpu:
                torch.cuda.synchronize()  # the window starts / ends with the GPU's queue empty
            now = time.perf_counter()
            if state.global_step == skip:
                self.sampled = on_gpu and self.sampler.start()
                self.start = now
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
            elif state.global_step == last and self.start is not None:
                readings = self.sampler.stop() if self.sampled else []
                self.result = {"seconds": now - self.start, "steps": last - skip, "data_wait_s": self.wait,
                               "busy_readings": readings}
                self.start = None
            self.prev_end = time.perf_counter()
    return Window()


def one_epoch_file(train_file: Path, samples: int) -> Path:
    """The caption file with its entries repeated until, with every caption its own pair (caption_mode "all"), an
    epoch has `samples` pairs: the timed steps lie inside one epoch, because a new epoch restarts the loader's
    prefetch queue (a stall real runs, with epochs of thousands of steps, rarely see). Every sample is still
    decoded from its JPEG."""
    from miniclip.files import atomic_write_text
    entries = json.loads(train_file.read_text(encoding="utf-8"))
    n = -(-samples // min(len(e["caption"]) for e in entries))
    path = train_file.with_name(f"{train_file.stem}-x{n}.json")
    if not path.is_file():
        atomic_write_text(path, json.dumps([entries[i % len(entries)] for i in range(n)], ensure_ascii=False))
    return path


def run(args) -> dict:
    import torch

    from miniclip.apps.train import main as train_main
    from miniclip.config import load_model_config
    from miniclip.data.synthetic import SyntheticSpec, ensure_synthetic
    on_gpu = args.device == "cuda"
    size = load_model_config(args.config).vision_cfg.image_size
    start = time.perf_counter()
    data = ensure_synthetic(Path(args.data_dir) / f"synthetic-{size}px-{args.images}",
                            SyntheticSpec(n_train=args.images, n_val=1, n_test=1, image_size=size))
    render_s = time.perf_counter() - start
    window = make_window(args.skip, args.steps, on_gpu)
    with tempfile.TemporaryDirectory() as out:
        train_file = one_epoch_file(data.train_file, args.batch * (args.steps + 1))
        argv = ["--model_config", args.config, "--train_file", str(train_file), "--output_dir", out,
                "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps),
                "--learning_rate", "5e-4", "--warmup_steps", "20", "--weight_decay", "0.1", "--bf16", "True",
                "--dataloader_num_workers", str(args.workers), "--dataloader_persistent_workers",
                str(args.workers > 0), "--dataloader_drop_last", "True", "--save_strategy", "no",
                "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "50", "--seed", "0",
                "--disable_tqdm", "True", "--use_cpu", str(not on_gpu), "--caption_mode", "all"]
        train_main(argv, callbacks=[window])
    r = window.result
    busy = r["busy_readings"]
    return {"config": args.config, "batch": args.batch, "workers": args.workers, "image_size": size,
            "steps_timed": r["steps"], "samples_per_s": args.batch * r["steps"] / r["seconds"],
            "gpu_busy_pct": statistics.mean(busy) if busy else None, "busy_readings": len(busy),
            "data_wait_pct": 100 * r["data_wait_s"] / r["seconds"], "render_s": render_s,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None}


def table(r: dict, line: str) -> str:
    head = (f"{line}\n\ntrain.py on the synthetic set at {r['image_size']} px ({r['config']}, batch {r['batch']}, "
            f"bf16, {r['workers']} dataloader workers), steady state over {r['steps_timed']} steps. GPU busy = mean "
            f"of {r['busy_readings']} NVML utilisation readings; data wait = share of wall time the loop spent "
            "between a step's end and the next step's start (fetching its batch).\n\n")
    return head + markdown_table(["samples/s", "GPU busy %", "data wait %", "peak MB (CUDA max allocated)"],
                                 [[fmt(r["samples_per_s"], 1), fmt(r["gpu_busy_pct"], 1), fmt(r["data_wait_pct"], 1),
                                   fmt(r["peak_mb"], 0)]])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the run")
    p.add_argument("--skip", type=int, default=50, help="steps before the timed window (start-up, warm-up)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 4) - 2),
                   help="--dataloader_num_workers (default: cores - 2)")
    p.add_argument("--images", type=int, default=3000, help="synthetic training images (cached under --data-dir)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "miniclip-bench"))
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--json", help="also write the result as JSON to this file")
    args = p.parse_args()
    if not 0 < args.skip < args.steps:
        p.error(f"--skip {args.skip} must be between 0 and --steps {args.steps}")
    line = machine_line(1, args.device)
    result = run(args)
    text = table(result, line)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
