"""Time to accuracy: two whole trainings side by side on Flickr8k, `python train.py` (miniclip) and
`python -m open_clip_train.main` (open_clip), each from process launch to exit (startup, data loading and the
final save included, timed here, not by the tools' logs), then both final models scored by ONE evaluator
(miniclip's strict loader + `evaluate_retrieval` on the Flickr8k test split, fp32). Reports wall time and mean
recall (the mean of i2t / t2i R@1/5/10) per implementation, mean ± std over seeds, and miniclip / open_clip ratios.

    python bench/e2e_speed.py --plot bench/e2e_speed.png          # tiny and vit224, seeds 0 1 2: ~25 min
    python bench/e2e_speed.py --size tiny --seeds 0 --steps 20 --no-wait    # a smoke run (~1 min)
One pair with the defaults on 2 shared cores (extrapolated from 20- and 60-step runs): tiny ~3.5 min, vit224 ~5 min,
evaluations included.

Matched settings (both command lines: `miniclip_command` / `open_clip_command`):
- architecture: the same model config JSON (miniclip --model_config; open_clip add_model_config + --model), QuickGELU
  only if the config says so (--force-quick-gelu); the same initial weights (same seed, same construction order);
- data: the first N = (images // batch) * batch training images (miniclip --max_train_samples N), so every pass is
  whole batches in both (open_clip drops the last partial batch); one caption per image per pass, the SAME one in
  both: open_clip's CSV holds one row per image per pass with miniclip's own `caption_choice(seed, pass, index)`
  (`csv_rows`); a last partial pass takes a seeded random subset of images in the CSV, a random subset of batches
  (the sampler's) in miniclip;
- steps and samples: miniclip --max_steps S; open_clip 1 epoch over S * batch CSV rows = S steps;
- batch (--per_device_train_batch_size / --batch-size), lr (--learning_rate / --lr), warmup steps and cosine decay to
  0 over S steps (--warmup_steps, --lr_scheduler_type cosine / --warmup, --lr-scheduler cosine), AdamW betas and eps
  (--adam_beta1/2, --adam_epsilon / --beta1/2, --eps), weight decay (--weight_decay / --wd), gradient clipping at
  total L2 norm 1 (--max_grad_norm / --grad-clip-norm), bf16 autocast on the CPU (--bf16 true --use_cpu true /
  --precision amp_bf16; fp32 weights and optimizer state in both), dataloader workers (--dataloader_num_workers /
  --workers), threads (OMP_NUM_THREADS for both), seed (--seed, both), augmentation (random resized crop, scale
  0.9-1, bicubic: miniclip --augment true, open_clip's default), no evaluation and one checkpoint, at the end.
What still differs between the two trainings (read from both codes) is listed in docs/e2e_speed.md.
Leaves out on purpose: GPUs, evaluation during training, and tuning (both get the same hyper-parameters).
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (REPO, bench_main, data_root, fmt, interleave, markdown_table, mean_std,  # noqa: E402
                          run_worker)

BENCH = Path(__file__).resolve().parent
JOBS = ("miniclip", "open_clip")
# tiny: the tests' tiny-vit (64 px, 16 patches, 2 layers). vit224: 224 px inputs but few tokens (32 px patches:
# 49 + 1) and 4 narrow layers per tower, so a pass over Flickr8k takes about a minute on one core; the shipped
# 224 px configs (TinyCLIP-ViT-8M-16, 196 tokens, 10 layers) would take several times longer per pass.
SIZES = {"tiny": (REPO / "model_configs" / "tiny-vit.json", 5), "vit224": (BENCH / "e2e-vit224.json", 2)}
RECALLS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                  "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]))")


def train_records(args) -> list:
    """The first whole-batch multiple of the training images (CaptionRecord, absolute image paths)."""
    from miniclip.data.dataset import load_records
    records = load_records(Path(args.data) / "flickr8k" / "en_train.json")
    n = len(records) // args.batch * args.batch
    if n == 0:
        raise ValueError(f"--batch {args.batch} is larger than the {len(records)} training images")
    return records[:n]


def total_steps(size: str, args, n_images: int) -> int:
    """--steps, else the size's default number of whole passes."""
    return args.steps if args.steps else SIZES[size][1] * (n_images // args.batch)


def csv_rows(records: list, seed: int, n_samples: int) -> list[tuple[str, str]]:
    """(image path, caption) rows: pass p holds every image once with caption `caption_choice(seed, p, index)`
    (what miniclip's caption_mode random picks for that image in epoch p); a last partial pass holds a seeded
    random subset of the images. Row order does not matter (open_clip shuffles the rows)."""
    import numpy as np
    from miniclip.data.dataset import caption_choice
    rows, n = [], len(records)
    for p in range(math.ceil(n_samples / n)):
        left = n_samples - p * n
        indices = range(n) if left >= n else sorted(np.random.default_rng([seed, p]).permutation(n)[:left].tolist())
        rows += [(str(records[i].image), records[i].captions[caption_choice(seed, p, i, len(records[i].captions))])
                 for i in indices]
    return rows


def write_csv(rows: list[tuple[str, str]], path: Path) -> None:
    """A tab-separated file as open_clip's CsvDataset reads it (pandas, header filepath / title)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)


def _quick_gelu(config_path: Path) -> bool:
    from miniclip.config import load_model_config
    return load_model_config(str(config_path)).quick_gelu


def miniclip_command(config: Path, args, seed: int, steps: int, n_images: int, out: Path) -> list[str]:
    flags = {"model_config": config, "train_file": Path(args.data) / "flickr8k" / "en_train.json",
             "caption_mode": "random", "max_train_samples": n_images, "augment": "true",
             "per_device_train_batch_size": args.batch, "max_steps": steps, "dataloader_drop_last": "true",
             "learning_rate": args.lr, "warmup_steps": args.warmup, "lr_scheduler_type": "cosine",
             "adam_beta1": args.beta1, "adam_beta2": args.beta2, "adam_epsilon": args.eps,
             "weight_decay": args.wd, "max_grad_norm": args.clip, "bf16": "true", "use_cpu": "true",
             "dataloader_num_workers": args.workers, "dataloader_persistent_workers": str(args.workers > 0).lower(),
             "seed": seed, "output_dir": out, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
             "logging_steps": 50, "disable_tqdm": "true"}
    return [sys.executable, str(REPO / "train.py"), *[x for k, v in flags.items() for x in (f"--{k}", str(v))]]


def open_clip_command(config: Path, args, seed: int, train_csv: Path, logs: Path) -> list[str]:
    flags = {"model": config.stem, "train-data": train_csv, "dataset-type": "csv", "csv-separator": "\t",
             "csv-img-key": "filepath", "csv-caption-key": "title", "batch-size": args.batch, "epochs": 1,
             "lr": args.lr, "warmup": args.warmup, "lr-scheduler": "cosine", "beta1": args.beta1,
             "beta2": args.beta2, "eps": args.eps, "wd": args.wd, "grad-clip-norm": args.clip,
             "precision": "amp_bf16", "device": "cpu", "workers": args.workers, "seed": seed, "logs": logs,
             "name": "run", "log-every-n-steps": 50, "save-frequency": 1}
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    if _quick_gelu(config):
        argv.append("--force-quick-gelu")
    return [sys.executable, "-c", OPEN_CLIP_MAIN, str(config), *argv]


def timed_run(command: list[str], log: Path, threads: int) -> float:
    """Wall seconds from launch to exit; output to `log`; a failure raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        start = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {code}); log {log}:\n{log.read_text()[-3000:]}")
    return seconds


def measure(job: tuple[str, str], rep: int, args, records: list) -> dict:
    """One training (timed) then its evaluation (a fresh process, not timed)."""
    size, impl = job
    config, seed = SIZES[size][0], args.seeds[rep]
    steps = total_steps(size, args, len(records))
    run = Path(args.workdir) / f"{size}-{impl}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if impl == "miniclip":
        seconds = timed_run(miniclip_command(config, args, seed, steps, len(records), run / "out"), run / "log.txt",
                            args.threads)
        model_path = run / "out"
    else:
        write_csv(csv_rows(records, seed, steps * args.batch), run / "train.csv")
        seconds = timed_run(open_clip_command(config, args, seed, run / "train.csv", run / "logs"), run / "log.txt",
                            args.threads)
        model_path = run / "logs" / "run"
    scores = run_worker(Path(__file__), ["--worker", impl, str(model_path), "--size", size, "--data", args.data,
                                         "--threads", str(args.threads)], args.threads)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return {"wall_s": seconds, **scores, "seed": seed, "steps": steps}


def worker(impl: str, model_path: str, args) -> dict:
    """Score one trained model: miniclip's strict loader (a miniclip folder or an open_clip_train run folder, its
    architecture read from what the run recorded), checked against the config the bench asked for."""
    import open_clip
    import torch
    from miniclip.checkpoints import load_pretrained
    from miniclip.config import load_model_config
    from miniclip.data.dataset import load_records
    from miniclip.evaluation.encode import Encoder, evaluate_retrieval
    from miniclip.tokenizer import get_tokenizer
    from miniclip.transforms import image_transform
    torch.set_num_threads(args.threads)
    config_path = SIZES[args.size[0]][0]
    open_clip.add_model_config(str(config_path))  # so params.txt's model name resolves
    model = load_pretrained(model_path)
    wanted = load_model_config(str(config_path))
    if (model.config.open_clip_cfg(), model.config.quick_gelu) != (wanted.open_clip_cfg(), wanted.quick_gelu):
        raise ValueError(f"{impl} trained another architecture than {config_path}: {model.config}")
    encoder = Encoder(model, image_transform(model.config, train=False), get_tokenizer(model.config), device="cpu",
                      progress=False)
    metrics = evaluate_retrieval(encoder, load_records(Path(args.data) / "flickr8k" / "en_test.json"))
    return {k: metrics[k] for k in RECALLS}


def add_args(p) -> None:
    p.add_argument("--size", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one pair of trainings per seed")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per training (default: 5 passes over the images at tiny, 2 at vit224)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping: max total L2 norm")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers (both)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (OMP_NUM_THREADS, both)")
    p.add_argument("--data", default=str(data_root()), help="folder holding flickr8k/en_{train,test}.json")
    p.add_argument("--workdir", default=None, help="where runs are written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (logs, CSV, checkpoints)")
    p.add_argument("--plot", default=None, help="write recall vs wall time (one point per run) to this PNG")


def measure_all(args) -> dict:
    temporary = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="e2e_speed_")
    records = train_records(args)
    jobs = [(size, impl) for size in args.size for impl in JOBS]
    try:
        results = interleave(jobs, len(args.seeds), lambda job, rep: measure(job, rep, args, records))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    return results


def _cell(runs: list[dict], key: str, digits: int) -> str:
    mean, std = mean_std(runs, key)
    return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if std is not None else "")


def table(results: dict, args) -> str:
    rows = []
    for size in args.size:
        m, o = results[(size, "miniclip")], results[(size, "open_clip")]
        for impl, runs in (("miniclip", m), ("open_clip", o)):
            rows.append([size, impl, runs[0]["steps"], _cell(runs, "wall_s", 1), _cell(runs, "mean_recall", 2),
                         _cell(runs, "i2t_R@1", 1), _cell(runs, "t2i_R@1", 1)])
        ratios = [mean_std(m, k)[0] / mean_std(o, k)[0] if mean_std(o, k)[0] else None
                  for k in ("wall_s", "mean_recall", "i2t_R@1", "t2i_R@1")]
        rows.append([size, "**miniclip / open_clip**", "", *[fmt(r, 3) for r in ratios]])
    return (f"Flickr8k train ({args.batch} x steps samples, one random caption per image per pass), test split "
            f"recall (%); bf16 CPU, {args.threads} thread(s), {args.workers} worker(s), lr {args.lr}, warmup "
            f"{args.warmup}, wd {args.wd}; mean ± std over seeds {' '.join(map(str, args.seeds))}\n\n"
            + markdown_table(["size", "impl", "steps", "wall time s", "mean recall", "i2t R@1", "t2i R@1"], rows))


def plot(results: dict, path: str) -> Path:
    """Mean recall (y) against wall time (x), one point per run, one panel per size."""
    from miniclip.evaluation.plots import plt, save_figure
    sizes = sorted({size for size, _ in results}, key=list(SIZES).index)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for impl, marker in zip(JOBS, "os"):
            runs = results[(size, impl)]
            ax.scatter([r["wall_s"] for r in runs], [r["mean_recall"] for r in runs], marker=marker, label=impl)
        ax.set_title(f"{size}: Flickr8k test, one point per run")
        ax.set_xlabel("wall time, launch to exit (s)")
        ax.set_ylabel("mean recall (%)")
        ax.set_xlim(0, 1.1 * max(r["wall_s"] for impl in JOBS for r in results[(size, impl)]))
        ax.margins(y=0.25)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def summary(results: dict, args) -> list[dict]:
    return [{"size": size, "impl": impl, **{k: mean_std(runs, k)[0] for k in ("wall_s", *RECALLS)},
             "runs": runs} for (size, impl), runs in results.items()]


if __name__ == "__main__":
    bench_main(__doc__, add_args, worker, measure_all, table, ("IMPL", "MODEL_PATH"), summary=summary)
