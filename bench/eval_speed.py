"""Wall times of evaluation on the real data: retrieval on Flickr8k en_test (1000 images, 5000 captions) and
zero-shot on the CIFAR-10 test set (10,000 images), with a randomly initialised tiny model (timing only).

  python bench/eval_speed.py --data ../shared/data [--model_config tiny-vit] [--bf16] [--engines torch onnxruntime]

Runs test.py's entry point (miniclip.apps.evaluate.main), so the times include decoding, the feature cache off, metrics and PNGs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import data_root  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(data_root()))
    parser.add_argument("--model_config", default="tiny-vit")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=256, help="images per batch (test.py's default)")
    parser.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "onnxruntime"],
                        help="test.py --engine values to time, one after the other (onnxruntime: export included)")
    parser.add_argument("--tasks", nargs="+", default=["retrieval", "zeroshot"], choices=["retrieval", "zeroshot"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    load_before = f"{os.getloadavg()[0]:.1f}"  # other processes on the machine inflate wall times
    from miniclip.apps.evaluate import main as evaluate  # what test.py runs
    common = ["--model_config", args.model_config, "--no_progress", "--batch_size", str(args.batch_size)]
    common += ["--bf16"] if args.bf16 else []
    with tempfile.TemporaryDirectory() as out:
        timings = {}
        tasks = {"retrieval": ("flickr8k en_test retrieval", ["--eval_file", str(data / "flickr8k" / "en_test.json")]),
                 "zeroshot": ("cifar10-test zero-shot", ["--zeroshot_dir", str(data / "cifar10-test")])}
        for engine in args.engines:
            for name, task in (tasks[t] for t in args.tasks):
                start = time.perf_counter()
                evaluate(common + task + ["--output_dir", out, "--engine", engine])
                timings[f"{name}, {engine}"] = time.perf_counter() - start
    print(f"\n{args.model_config}, {torch.get_num_threads()} threads, batch {args.batch_size}, bf16={args.bf16}, "
          f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f}")
    for name, seconds in timings.items():
        print(f"{name:<40} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
