"""Ablation grids: one YAML file names train.py's base arguments, named variants (overrides of them) and seeds;
every (variant, seed) runs train.py in its own subprocess and output folder, keyed by a hash of its resolved
arguments, so finished runs are reused and an interrupted grid resumes. The results (ablation.md / .csv / .png) are
written by ablation_report.py. Leaves out on purpose: running several runs at once and cluster schedulers.

    python -m miniclip.apps.ablate examples/grids/synthetic.yaml [--launcher torchrun --launcher_args "--nproc_per_node 2"]
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from miniclip.apps.ablation_report import DONE, write_report
from miniclip.apps.cli import run_cli
from miniclip.config import check_literal
from miniclip.files import atomic_write_text, read_mapping_file
from miniclip.training import arguments
from miniclip.training.arguments import as_argv

Launcher = Literal["python", "accelerate", "torchrun"]
GRID_KEYS = ("name", "description", "output_dir", "base", "variants", "seeds", "metrics", "curve_metric",
             "launcher", "launcher_args")
MANAGED = ("output_dir", "seed", "resume_from_checkpoint")  # set by the grid for each run, never by the YAML
FAILED, SPEC, LOG = "ablate_failed.json", "ablate_run.json", "train.log"
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")  # ${VAR} or ${VAR:-default}
TRAIN_MODULE = "miniclip.apps.train"  # what each run executes (`python -m`), unless --train_script names a script


@dataclass
class AblateArguments:
    grid: str = field(metadata={"help": "The grid YAML file (also accepted as the first positional argument)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where runs and tables go (default: the grid's "
                                                                     "output_dir, else output/ablate/<grid name>)."})
    launcher: Launcher | None = field(default=None, metadata={"help": (
        "'python': `python train.py ...`; 'accelerate': `accelerate launch [launcher_args] train.py ...`; "
        "'torchrun': `torchrun [launcher_args] train.py ...` (several CPU processes with gloo) "
        "(default: the grid's launcher, else python). Part of each run's key.")})
    launcher_args: str | None = field(default=None, metadata={"help": (
        "Extra launcher arguments, one string, e.g. \"--multi_gpu --num_processes 4\" (accelerate) or "
        "\"--nproc_per_node 2\" (torchrun). Part of each run's key.")})
    train_script: str | None = field(default=None, metadata={"help": (
        f"A train.py-compatible script to run instead of `python -m {TRAIN_MODULE}`.")})
    dry_run: bool = field(default=False, metadata={"help": "List the runs and whether each is finished; train nothing."})
    report_only: bool = field(default=False, metadata={"help": "Write the tables and plot from the finished runs only."})
    show_output: bool = field(default=False, metadata={"help": (
        "Print each run's training output as it runs (it always goes to train.log in the run's folder).")})

    def __post_init__(self):
        if self.launcher is not None:
            check_literal(self.launcher, Launcher, "launcher")


@dataclass
class Grid:
    """A parsed grid file: what to run. `variants` maps a name to its overrides of `base`."""
    path: Path
    name: str
    output_dir: Path
    base: dict
    variants: dict[str, dict]
    seeds: list[int]
    metrics: list[str] | None = None
    curve_metric: str = "eval_mean_recall"
    launcher: str = "python"
    launcher_args: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class Run:
    """One (variant, seed): its train.py arguments (without output_dir), key and folder."""
    variant: str
    seed: int
    args: dict
    key: str
    dir: Path
    status: str = "pending"  # pending -> reused / trained / failed

    @property
    def done(self) -> bool:
        return (self.dir / DONE).is_file()


# --- reading the grid -------------------------------------------------------------------------------------------------
def _expand(value, where: str):
    """${VAR} / ${VAR:-default} in strings, recursively (paths to data are machine-specific)."""
    if isinstance(value, str):
        def sub(match):
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is None:
                raise ValueError(f"{where}: environment variable ${{{name}}} is not set. Fix: export {name}=..., "
                                 f"or write ${{{name}:-default}} in the grid")
            return default
        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of train.py argument names to values, got "
                         f"{type(value).__name__}: {value!r}")
    for key in value:
        if key in MANAGED:
            raise ValueError(f"{where}.{key}: the grid sets {list(MANAGED)} for each run. Fix: remove it (use the "
                             "top-level output_dir and seeds keys)")
    return value


def load_grid(path: str | Path, output_dir: str | None = None) -> Grid:
    """Read and check a grid YAML (or JSON) file; raise ValueError / FileNotFoundError naming the key and the fix."""
    path = Path(path)
    data = read_mapping_file(path, "grid file")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"grid file {path}: unknown key(s) {unknown}; valid keys: {list(GRID_KEYS)}. train.py "
                         "arguments go under base: or under a variant")
    base = _mapping(_expand(data.get("base"), f"{path}: base"), f"{path}: base")
    raw_variants = data.get("variants") or {"base": {}}
    if not isinstance(raw_variants, dict):
        raise ValueError(f"{path}: variants must be a mapping name -> overrides (an empty mapping for the base run)")
    variants = {}
    for name, overrides in raw_variants.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{path}: variant name {name!r} must be letters, digits and _ . + - (it names folders)")
        variants[name] = _mapping(_expand(overrides, f"{path}: variants.{name}"), f"{path}: variants.{name}")
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds must be a list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    name = str(data.get("name") or path.stem)
    launcher = data.get("launcher", "python")
    check_literal(launcher, Launcher, f"{path}: launcher")
    metrics = data.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        raise ValueError(f"{path}: metrics must be a list of metric names, e.g. [eval_t2i_R@1, train_loss]")
    out = output_dir or _expand(data.get("output_dir"), f"{path}: output_dir") or f"output/ablate/{name}"
    return Grid(path, name, Path(out), base, variants, seeds, metrics, str(data.get("curve_metric",
                "eval_mean_recall")), launcher, shlex.split(str(data.get("launcher_args") or "")),
                str(data.get("description") or ""))


# --- resolving runs ---------------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None), dict)) else str(value)


def resolve_args(values: dict, where: str) -> dict:
    """Parse `values` with train.py's own parser (types, choices, checks) and return each given argument's typed
    value: 1e-3 and 0.001 give the same run key. Unknown names fail here, before any run starts."""
    import dataclasses
    import difflib
    known = {f.name for cls in (arguments.ModelArguments, arguments.DataArguments, arguments.ClipTrainingArguments)
             for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise ValueError(f"{where}: {key!r} is not a train.py argument" + (f"; did you mean {close}?" if close
                             else ". See `python train.py --help`"))
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its complaint and exits: keep the complaint only
            parsed = arguments.parse_args(as_argv({**values, "output_dir": tempfile.gettempdir()}))[:3]
    except (ValueError, SystemExit) as e:
        reason = str(e) if isinstance(e, ValueError) else usage.getvalue().strip().splitlines()[-1]
        if "'False'" in reason or "'True'" in reason:
            reason += " (YAML reads unquoted no / yes / off / on as booleans: quote them, e.g. save_strategy: \"no\")"
        raise ValueError(f"{where}: train.py refuses these arguments: {reason}. Fix the value in the grid") from None
    return {key: _jsonable(next(getattr(p, key) for p in parsed if hasattr(p, key))) for key in values}


def run_key(resolved: dict, launcher: list[str]) -> str:
    text = json.dumps({"args": resolved, "launcher": launcher}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def plan_runs(grid: Grid) -> list[Run]:
    """Every (variant, seed) with its arguments, key and folder: an existing folder with the same key (a renamed
    variant) is reused."""
    launcher = [grid.launcher, *grid.launcher_args] if grid.launcher != "python" else ["python"]
    runs = []
    for seed in grid.seeds:  # seed-major: a grid stopped early still has every variant for the first seeds
        for variant, overrides in grid.variants.items():
            # null in a variant removes a base argument (train.py's default applies): e.g. model_config: null
            args = {k: v for k, v in {**grid.base, **overrides, "seed": seed}.items() if v is not None}
            key = run_key(resolve_args(args, f"{grid.path}: variant {variant!r}, seed {seed}"), launcher)
            found = sorted((grid.output_dir / "runs").glob(f"*-{key}"))
            folder = next((f for f in found if (f / DONE).is_file()), None) or (
                found[0] if found else grid.output_dir / "runs" / f"{variant}-s{seed}-{key}")
            runs.append(Run(variant, seed, args, key, folder))
    return runs


# --- running ----------------------------------------------------------------------------------------------------------
def run_command(run: Run, grid: Grid, train_script: str | Path | None = None) -> list[str]:
    """The subprocess: a training run in a fresh interpreter, so a crash (or an OOM kill) ends that run only."""
    argv = as_argv({**run.args, "output_dir": str(run.dir), "resume_from_checkpoint": "latest"})
    target = [str(train_script)] if train_script is not None else ["-m", TRAIN_MODULE]
    if grid.launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", *grid.launcher_args, *target, *argv]
    if grid.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *grid.launcher_args, *target, *argv]
    return [sys.executable, *target, *argv]


def _child_env() -> dict:
    """The parent's environment, with this miniclip first on the path (the same code runs in every child)."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _final_logit_scale(folder: Path) -> float | None:
    """exp of the saved log-temperature: the multiplier the run ended with (the tutorial's accident shows as 1)."""
    import math
    from safetensors import safe_open
    path = folder / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return math.exp(float(f.get_tensor("logit_scale.logit_scale").float()))


def execute(run: Run, grid: Grid, train_script: str | Path | None = None, show_output: bool = False) -> bool:
    """Train one run; on success write its DONE marker (atomically, last), else a FAILED note. -> success."""
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / FAILED).unlink(missing_ok=True)
    command = run_command(run, grid, train_script)
    atomic_write_text(run.dir / SPEC, json.dumps({"variant": run.variant, "seed": run.seed, "key": run.key,
                                                  "args": run.args, "command": command}, indent=2) + "\n")
    start = time.time()
    with open(run.dir / LOG, "w", encoding="utf-8", buffering=1) as log:  # line-buffered: `tail -f` works
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=_child_env())
        for line in process.stdout:
            log.write(line)
            if show_output:
                tqdm.write(line.rstrip())
        code = process.wait()
    results = run.dir / "all_results.json"
    if code != 0 or not results.is_file():
        tail = (run.dir / LOG).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        atomic_write_text(run.dir / FAILED, json.dumps({"returncode": code, "log_tail": tail}, indent=2) + "\n")
        tqdm.write(f"run {run.variant} seed {run.seed} FAILED (exit code {code}); last lines of {run.dir / LOG}:\n  "
                   + "\n  ".join(tail))
        return False
    metrics = json.loads(results.read_text(encoding="utf-8"))
    metrics["logit_scale"] = _final_logit_scale(run.dir)
    atomic_write_text(run.dir / DONE, json.dumps({
        "variant": run.variant, "seed": run.seed, "key": run.key, "args": run.args, "metrics": metrics,
        "wall_time_s": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    return True


def run_grid(grid: Grid, train_script: str | Path | None = None, dry_run: bool = False,
             report_only: bool = False, show_output: bool = False) -> list[Run]:
    """Run every unfinished (variant, seed) in order, reuse the finished ones, then write the report.
    Each run's status ends as 'reused', 'trained', 'failed' or (dry run / report only) 'pending'."""
    runs = plan_runs(grid)
    total = len(runs)
    if dry_run:
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{total}] {run.variant} seed {run.seed}: {'finished' if run.done else 'to run'} -> {run.dir}")
        return runs
    bar = tqdm(runs, desc=f"ablation {grid.name}", unit="run")
    for i, run in enumerate(bar, 1):
        label = f"[{i}/{total}] {run.variant} seed {run.seed}"
        if run.done:
            run.status = "reused"
            tqdm.write(f"{label}: finished before, reused ({run.dir})")
            continue
        if report_only:
            continue
        bar.set_postfix_str(f"{run.variant} seed {run.seed}")
        tqdm.write(f"{label}: training -> {run.dir} (log: {run.dir / LOG})")
        run.status = "trained" if execute(run, grid, train_script, show_output) else "failed"
    bar.close()
    finished = [run for run in runs if run.done]
    if finished:
        for path in write_report(grid, finished):
            print(f"wrote {path}")
    return runs


def parse_args(argv: list[str]) -> AblateArguments:
    if argv and not argv[0].startswith("-"):  # `python -m miniclip.apps.ablate GRID.yaml ...`
        argv = ["--grid", argv[0], *argv[1:]]
    (args,) = HfArgumentParser(AblateArguments).parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> list[Run]:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.train_script is not None and not Path(args.train_script).is_file():
        raise FileNotFoundError(f"train script not found: {args.train_script}. Fix: pass --train_script "
                                "path/to/train.py, or leave it out to run miniclip.apps.train")
    grid = load_grid(args.grid, args.output_dir)
    if args.launcher is not None:
        grid.launcher = args.launcher
    if args.launcher_args is not None:
        grid.launcher_args = shlex.split(args.launcher_args)
    runs = run_grid(grid, args.train_script, args.dry_run, args.report_only, args.show_output)
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed: " + ", ".join(
            f"{r.variant} seed {r.seed} ({r.dir / LOG})" for r in failed) + ". Rerun the grid to retry them.")
    return runs


def cli(argv: list[str] | None = None) -> None:
    """The `miniclip-ablate` console script (and `python -m miniclip.apps.ablate`)."""
    run_cli(main, argv, prog="miniclip-ablate")


if __name__ == "__main__":
    cli()
