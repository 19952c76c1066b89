"""Wall times of evaluation on the real data: retrieval on Flickr8k en_test (1000 images, 5000 captions) and
zero-shot on the CIFAR-10 test set (10,000 images), with a randomly initialised tiny model (timing only).

  python bench/eval_speed.py --data ../shared/data [--model_config tiny-vit] [--bf16]

Runs test.py's entry point, so the times include decoding, the feature cache off, metrics and PNGs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("miniclip_test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MINICLIP_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--model_config", default="tiny-vit")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=256, help="images per batch (test.py's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    load_before = f"{os.getloadavg()[0]:.1f}"  # other processes on the machine inflate wall times
    script = load_script()
    common = ["--model_config", args.model_config, "--no_progress", "--batch_size", str(args.batch_size)]
    common += ["--bf16"] if args.bf16 else []
    with tempfile.TemporaryDirectory() as out:
        timings = {}
        for name, task in (("flickr8k en_test retrieval", ["--eval_file", str(data / "flickr8k" / "en_test.json")]),
                           ("cifar10-test zero-shot", ["--zeroshot_dir", str(data / "cifar10-test")])):
            start = time.perf_counter()
            script.main(common + task + ["--output_dir", out])
            timings[name] = time.perf_counter() - start
    print(f"\n{args.model_config}, {torch.get_num_threads()} threads, batch {args.batch_size}, bf16={args.bf16}, "
          f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f}")
    for name, seconds in timings.items():
        print(f"{name:<28} {seconds:7.1f} s")


if __name__ == "__main__":
    main()
