"""Every benchmark in one command: training (bf16 and fp32), evaluation encode, data pipeline; miniclip against
open_clip and transformers in the same run. Prints the tables and writes them to bench/RESULTS.md (or --out).

    python bench/run_all.py --quick            # ~10 min on 2 CPU cores
    python bench/run_all.py --ablations        # also each miniclip lever switched back, and the Trainer's own loop
    python bench/run_all.py --device cuda --config OpenAI-ViT-B-16 --batch 256 --precisions bf16   # on a GPU

On a shared machine it first waits (up to 20 min) for the 1-minute load average to fall below 1.0.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import data_speed, encode_speed, train_speed  # noqa: E402
from bench.common import load_average, machine_line, wait_for_quiet  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    p.add_argument("--ablations", action="store_true", help="also the miniclip ablations of each benchmark")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "encode", "data"])
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = p.parse_args()
    if args.device == "cpu" and not args.no_wait and not wait_for_quiet():
        print("WARNING: the machine never got quiet; the numbers below are noisy", flush=True)
    reps = 3 if args.quick else 5
    common = dict(config=args.config, threads=args.threads, reps=reps, ablations=args.ablations)
    sections = [f"Run {time.strftime('%Y-%m-%d %H:%M')}: {machine_line(args.threads, args.device)}."]
    if "train" not in args.skip:
        targs = argparse.Namespace(**common, batch=args.batch, steps=3 if args.quick else 6, warmup=2,
                                   device=args.device, precisions=args.precisions, impls=list(train_speed.IMPLS))
        sections.append(train_speed.table(train_speed.measure_all(targs), targs))
        print(sections[-1], flush=True)
    if "encode" not in args.skip:
        eargs = argparse.Namespace(**common, batches=2 if args.quick else 4, image_batch=64, device=args.device,
                                   precisions=args.precisions, impls=list(encode_speed.IMPLS))
        sections.append(encode_speed.table(encode_speed.measure_all(eargs), eargs))
        print(sections[-1], flush=True)
    if "data" not in args.skip:
        for synthetic in (False, True):
            dargs = argparse.Namespace(**common, images=128 if args.quick else 256, batch=args.batch,
                                       synthetic=synthetic, impls=list(data_speed.IMPLS))
            sections.append(data_speed.table(data_speed.measure_all(dargs), dargs))
            print(sections[-1], flush=True)
    sections.append(f"Load average at the end: {load_average():.2f}.")
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
