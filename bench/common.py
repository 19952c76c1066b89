"""Shared benchmark plumbing: one fresh subprocess per measurement (so peak memory is its own), implementations
interleaved within each repetition (so machine noise hits all of them alike), medians and miniclip / peer ratios.

Leaves out on purpose: statistics beyond the median, min-max spread and mean / std (run more repetitions instead).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The real data folder (Flickr8k, CIFAR-10 test): `$MINICLIP_DATA`, else `../shared/data` beside the repo."""
    return Path(os.environ.get("MINICLIP_DATA", REPO.parent / "shared" / "data"))
CAPTIONS = ["A dog runs across the grass with a ball in its mouth .", "Two children play on a skateboard .",
            "a man in a red jacket climbs a snowy mountain", "A group of people stand outside a building .",
            "The black and white dog is jumping over a hurdle in a field near some trees .", "a cat on a sofa",
            "A little girl in a pink dress is climbing the stairs of a wooden playhouse .",
            "Two men are fishing from a small boat on a calm lake at sunset ."]


def captions(n: int) -> list[str]:
    """n real-length English captions (Flickr8k style, 8-20 BPE tokens)."""
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float = 1.0, checks: int = 3, interval: float = 20.0, max_wait: float = 1200.0) -> bool:
    """Sleep until the 1-minute load average is below `max_load` for `checks` readings in a row (max `max_wait` s).
    Returns False (and goes on) when the machine never got quiet: the tables then say so."""
    deadline, quiet = time.time() + max_wait, 0
    while time.time() < deadline:
        quiet = quiet + 1 if load_average() < max_load else 0
        if quiet >= checks:
            return True
        print(f"waiting for a quiet machine: load {load_average():.2f} (want < {max_load} x{checks})", flush=True)
        time.sleep(interval)
    return False


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): /proc's VmHWM, which starts afresh at exec. getrusage's ru_maxrss
    does not: Linux carries it over from the parent, so every worker of a large parent would report its peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and BSDs report KiB


def run_worker(script: Path, args: list[str], threads: int) -> dict:
    """Run `script --worker ...` in a fresh interpreter; its last stdout line is a JSON dict."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"benchmark worker {script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def try_worker(script: Path, args: list[str], threads: int) -> dict:
    """`run_worker`, but a failed measurement (a peer that runs out of GPU memory, say) becomes {"error": its last
    stderr line} in the table instead of ending the whole benchmark."""
    try:
        return run_worker(script, args, threads)
    except RuntimeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        return {"error": lines[-1][:160] if lines else "failed"}


def interleave(jobs: list[tuple], reps: int, measure, label=lambda job: " ".join(map(str, job))) -> dict:
    """`measure(job, rep) -> dict` for every job, `reps` times, jobs interleaved within each repetition; the job
    order rotates each repetition so that no implementation always runs first or right after a heavy one."""
    results: dict = {}
    for rep in range(reps):
        shift = rep % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            r = measure(job, rep)
            results.setdefault(job, []).append(r)
            print(f"  rep {rep + 1}/{reps} {label(job):40s} " +
                  " ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, (int, float))), flush=True)
    return results


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else "-"


def mean_std(runs: list[dict], key: str) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of `key` over the runs that have it; std is None below two runs."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(threads: int, device: str = "cpu") -> str:
    import torch
    if device == "cuda" and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU, {threads} threads of {os.cpu_count()} cores"
    return f"torch {torch.__version__}, {where}, load average at start {load_average():.2f}"


def bench_main(doc: str, add_args, worker, measure_all, table, worker_metavar: tuple[str, str], extra=None,
               summary=None) -> None:
    """The command line every bench script shares: `--worker A B` runs one measurement in this (fresh) process and
    prints it as JSON; otherwise wait for a quiet CPU, run all measurements interleaved, print the table.
    `extra(parser)` adds script-only flags and returns a function that handles them (True = handled).
    `summary(measured, args)` -> list of dicts (one per table row), written by `--json FILE`."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--out", help="also write the machine line and the table (markdown) to this file")
    p.add_argument("--json", help="also write the table's rows as JSON to this file" if summary else argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=worker_metavar, help=argparse.SUPPRESS)
    handle_extra = extra(p) if extra else None
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    if handle_extra and handle_extra(args):
        return
    device = getattr(args, "device", "cpu")
    if device == "cpu" and not args.no_wait:
        wait_for_quiet()
    line = machine_line(args.threads, device)
    print(line, flush=True)
    measured = measure_all(args)
    text = table(measured, args)
    print(text)
    if args.out:
        Path(args.out).write_text(f"{line}\n\n{text}\n")
    if args.json and summary:
        Path(args.json).write_text(json.dumps(summary(measured, args), indent=1) + "\n")
