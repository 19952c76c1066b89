"""Training speed with FLIP patch dropout (Li et al., CVPR 2023): miniclip and open_clip, each with and without
dropping patches, in the same run. Both use open_clip's `PatchDropout` (set by `vision_cfg.patch_dropout`), so the
ratio p=0.5 / p=0 is the gain of the trick in each project and miniclip / open_clip the gap at equal settings.

The step is train_speed.py's (forward + loss + backward + AdamW, fresh process per measurement, interleaved);
this script only writes one config JSON per dropout rate and tabulates.

    python bench/patch_dropout_speed.py --config TinyCLIP-ViT-40M-32-Text-19M --p 0.5 --batch 16 --reps 3
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import train_speed  # noqa: E402
from bench.common import interleave, machine_line, markdown_table, median, run_worker, spread  # noqa: E402

IMPLS = ("miniclip", "open_clip")


def config_file(name: str, p: float, folder: Path) -> Path:
    """The named model config with vision_cfg.patch_dropout = p, as a JSON file train_speed's worker reads."""
    from miniclip.config import load_model_config
    data = load_model_config(name).to_dict()
    data["vision_cfg"]["patch_dropout"] = p
    data["name"] = f"{name}+patch_dropout{p:g}"
    path = folder / f"patch_dropout_{p:g}.json"
    path.write_text(json.dumps(data))
    return path


def measure_all(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        configs = {p: config_file(args.config, p, Path(tmp)) for p in (0.0, args.p)}
        jobs = [(impl, p) for p in configs for impl in args.impls]

        def measure(job, rep):
            impl, p = job
            return run_worker(Path(train_speed.__file__), [
                "--worker", impl, args.precision, "--config", str(configs[p]), "--batch", str(args.batch),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                "--device", args.device], args.threads)
        return interleave(jobs, args.reps, measure, label=lambda job: f"{job[0]} patch_dropout={job[1]:g}")


def table(results: dict, args) -> str:
    rows = []
    for (impl, p), runs in results.items():
        speed = median(runs, "samples_per_s")
        base = median(results[(impl, 0.0)], "samples_per_s")
        peer = results.get(("open_clip", p))
        rows.append([impl, f"{p:g}", f"{speed:.2f}", spread(runs, "samples_per_s"), f"{speed / base:.2f}x",
                     f"{speed / median(peer, 'samples_per_s'):.2f}x" if peer and impl != "open_clip" else "-"])
    head = (f"Training with patch dropout, {args.config}, batch {args.batch}, {args.precision}, {args.device}, "
            f"{args.threads} threads, median of {args.reps} runs x {args.steps} steps.\n\n")
    return head + markdown_table(["implementation", "patch dropout", "samples/s", "range", "vs p=0 (same impl)",
                                  "vs open_clip (same p)"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--p", type=float, default=0.5, help="patch dropout rate compared with 0")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    args = p.parse_args()
    print(machine_line(args.threads, args.device))
    print(table(measure_all(args), args))


if __name__ == "__main__":
    main()
