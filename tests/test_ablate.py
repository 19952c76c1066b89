"""miniclip.apps.ablate / ablation_report: a 2-variant x 2-seed grid of real train.py runs (tiny ViT, a few steps, generated
shapes) through `python -m miniclip.apps.ablate`, its table / CSV / PNG checked against the runs' own Trainer files;
rerunning reuses every finished run; a lost marker reruns that run only; a crashing run does not stop the grid;
bad grid files fail before anything trains."""
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from miniclip.apps import ablate
from miniclip.apps.ablation_report import aggregate, best_variants, markdown_table
from miniclip.data.synthetic import SyntheticSpec, ensure_synthetic

REPO = Path(__file__).resolve().parent.parent
TINY = """
base:
  model_config: tiny-vit
  train_file: {data}/train.json
  validation_file: {data}/val.json
  max_steps: {steps}
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 32
  learning_rate: 1e-3
  logging_steps: 1
  eval_strategy: "{eval_strategy}"
  eval_steps: 2
  save_strategy: "no"
  report_to: none
  use_cpu: true
  bf16: false
  disable_tqdm: true
  dataloader_num_workers: 0
"""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("shapes"), SyntheticSpec(n_train=32, n_val=12, n_test=4)).root


def _grid(tmp_path: Path, data: Path, body: str, steps: int = 3, eval_strategy: str = "steps") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(f"name: tiny\noutput_dir: {tmp_path / 'out'}\n"
                    + TINY.format(data=data, steps=steps, eval_strategy=eval_strategy) + body)
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_table_csv_png_and_reuse(tmp_path, shapes):
    grid = _grid(tmp_path, shapes, "variants:\n  learnable: {}\n"
                 "  fixed_t1: {init_logit_scale: 0.0, learn_logit_scale: false}\nseeds: [0, 1]\n")
    done = subprocess.run([sys.executable, "-m", "miniclip.apps.ablate", str(grid)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[4/4] fixed_t1 seed 1: training" in done.stderr + done.stdout
    out = tmp_path / "out"
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4
    # Every run really trained with its own seed, folder and variant arguments (the Trainer's own records).
    truth = {}
    for folder in runs:
        spec = json.loads((folder / ablate.SPEC).read_text())
        args = json.loads((folder / "training_args.json").read_text())
        assert args["seed"] == spec["seed"] and Path(args["output_dir"]) == folder
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == 3 and any("eval_mean_recall" in e for e in state["log_history"])
        truth[(spec["variant"], spec["seed"])] = json.loads((folder / "all_results.json").read_text())
    # The table's numbers are the mean and sample std over seeds of each run's final eval metrics.
    table = {row["variant"]: row for row in _read_csv(out / "ablation.csv")}
    assert set(table) == {"learnable", "fixed_t1"}
    for variant, row in table.items():
        for metric in ("eval_t2i_R@1", "eval_mean_recall", "train_loss"):
            values = [truth[(variant, s)][metric] for s in (0, 1)]
            assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))
    # fixed at 1 stays exactly 1 (exp(0)); the learnable one starts at 1/0.07 and moves
    assert float(table["fixed_t1"]["logit_scale_mean"]) == 1.0
    assert 10 < float(table["learnable"]["logit_scale_mean"]) < 20
    assert float(table["learnable"]["logit_scale_mean"]) != pytest.approx(1 / 0.07, abs=1e-6)
    better = max(table, key=lambda v: float(table[v]["eval_mean_recall_mean"]))
    assert table[better]["eval_mean_recall_best"] == "1"
    md = (out / "ablation.md").read_text()
    assert "| variant | seeds | eval_t2i_R@1 |" in md and "| learnable | 2 |" in md and "| fixed_t1 | 2 |" in md
    assert f"**{float(table[better]['eval_mean_recall_mean']):.2f} ±" in md
    assert len(_read_csv(out / "ablation_runs.csv")) == 4
    with Image.open(out / "ablation.png") as png:
        assert png.format == "PNG" and png.size[0] > 500 and png.size[1] > 200

    # Rerun: every run is reused, nothing is trained or rewritten.
    stamps = {p: p.stat().st_mtime_ns for folder in runs for p in folder.iterdir()}
    again = ablate.main([str(grid)])
    assert [r.status for r in again] == ["reused"] * 4
    assert {p: p.stat().st_mtime_ns for folder in runs for p in folder.iterdir()} == stamps

    # An interrupted grid (a run without its marker) resumes: only that run trains again.
    lost = next(f for f in runs if f.name.startswith("fixed_t1-s1"))
    (lost / ablate.DONE).unlink()
    resumed = ablate.main([str(grid)])
    assert [(r.variant, r.seed, r.status) for r in resumed if r.status != "reused"] == [("fixed_t1", 1, "trained")]
    assert (lost / ablate.DONE).is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent != lost)


def test_crashing_run_does_not_stop_the_grid(tmp_path, shapes):
    grid = _grid(tmp_path, shapes, "variants:\n  broken: {train_file: %s}\n  ok: {}\nseeds: [0]\n"
                 % (tmp_path / "missing.json"), steps=1, eval_strategy="no")
    with pytest.raises(SystemExit, match="1 of 2 runs failed: broken seed 0"):
        ablate.main([str(grid)])
    broken, ok = (next((tmp_path / "out" / "runs").glob(f"{v}-*")) for v in ("broken", "ok"))
    failure = json.loads((broken / ablate.FAILED).read_text())
    assert failure["returncode"] != 0 and any("missing.json" in line for line in failure["log_tail"])
    assert not (broken / ablate.DONE).exists() and (ok / ablate.DONE).is_file()
    assert [r["variant"] for r in _read_csv(tmp_path / "out" / "ablation_runs.csv")] == ["ok"]


def test_run_keys_follow_resolved_arguments(tmp_path, shapes):
    """1e-3 (a string to YAML 1.1) and 0.001 are the same run; key order does not matter; any change is a new run."""
    grid = _grid(tmp_path, shapes, "variants:\n  a: {}\n  same: {learning_rate: 0.001, max_steps: 3}\n"
                 "  other_lr: {learning_rate: 0.002}\n  siglip: {loss: siglip}\n  default_lr: {learning_rate: null}\n"
                 "seeds: [0, 1]\n")
    runs = ablate.plan_runs(ablate.load_grid(grid))
    keys = {(r.variant, r.seed): r.key for r in runs}
    assert keys[("a", 0)] == keys[("same", 0)] and keys[("a", 1)] == keys[("same", 1)]
    assert len({keys[(v, 0)] for v in ("a", "other_lr", "siglip")} | {keys[("a", 1)]}) == 4
    assert runs[0].dir.name == f"a-s0-{keys[('a', 0)]}"
    unset = next(r for r in runs if r.variant == "default_lr")
    assert "learning_rate" not in unset.args and unset.key not in (keys[("a", 0)], keys[("other_lr", 0)])
    assert [(r.variant, r.seed) for r in runs[:4]] == [("a", 0), ("same", 0), ("other_lr", 0), ("siglip", 0)]
    assert ablate.run_command(runs[0], ablate.load_grid(grid), "train.py")[1:3] == ["train.py", "--model_config"]
    launched = ablate.load_grid(grid)
    launched.launcher, launched.launcher_args = "accelerate", ["--num_processes", "2"]
    assert ablate.plan_runs(launched)[0].key != keys[("a", 0)]  # 2 processes = 2x the global batch: another run
    launched.launcher, launched.launcher_args = "torchrun", ["--nproc_per_node", "2"]
    command = ablate.run_command(runs[0], launched, "train.py")
    assert command[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"]


@pytest.mark.parametrize("body,message", [
    ("variants:\n  a: {learning_rat: 0.1}\n", r"'learning_rat' is not a train.py argument; did you mean \['learning_rate'"),
    ("variants:\n  a: {loss: infonce}\n", r"variant 'a', seed 0: train.py refuses these arguments.*infonce"),
    ("variants:\n  a: {output_dir: x}\n", r"variants.a.output_dir: the grid sets"),
    ("variants:\n  a: {seed: 3}\n", r"variants.a.seed: the grid sets"),
    ("variants:\n  a/b: {}\n", r"variant name 'a/b'"),
    ("seeds: [0, 0]\n", r"seeds must be a list of distinct integers"),
    ("seed: [0]\n", r"unknown key\(s\) \['seed'\]"),
    ("launcher: slurm\n", r"launcher='slurm' is not one of"),
    ("variants:\n  a: {eval_strategy: no}\n", r"invalid choice: 'False'.*quote them"),
    ("variants:\n  a: {validation_file: '${MINICLIP_NO_SUCH_VAR}/v.json'}\n",
     r"MINICLIP_NO_SUCH_VAR\} is not set"),
])
def test_bad_grid_is_refused_before_training(tmp_path, shapes, body, message):
    grid = _grid(tmp_path, shapes, body)
    with pytest.raises(ValueError, match=message):
        ablate.plan_runs(ablate.load_grid(grid))
    assert not (tmp_path / "out").exists()


def test_environment_defaults_expand(tmp_path, shapes, monkeypatch):
    monkeypatch.delenv("MINICLIP_NO_SUCH_VAR", raising=False)
    grid = _grid(tmp_path, shapes, "variants:\n  a: {validation_file: '${MINICLIP_NO_SUCH_VAR:-/data}/v.json'}\n")
    assert ablate.load_grid(grid).variants["a"]["validation_file"] == "/data/v.json"
    monkeypatch.setenv("MINICLIP_NO_SUCH_VAR", "/elsewhere")
    assert ablate.load_grid(grid).variants["a"]["validation_file"] == "/elsewhere/v.json"


def test_aggregate_and_best_by_hand():
    records = [{"variant": "a", "seed": 0, "metrics": {"eval_t2i_R@1": 10.0, "eval_t2i_median_rank": 4.0}},
               {"variant": "a", "seed": 1, "metrics": {"eval_t2i_R@1": 20.0, "eval_t2i_median_rank": 6.0}},
               {"variant": "b", "seed": 0, "metrics": {"eval_t2i_R@1": 15.0, "eval_t2i_median_rank": 3.0,
                                                       "logit_scale": 1.0}},
               {"variant": "b", "seed": 1, "metrics": {"eval_t2i_R@1": float("nan"), "eval_t2i_median_rank": 3.0,
                                                       "logit_scale": 1.0}}]
    metrics = ["eval_t2i_R@1", "eval_t2i_median_rank", "logit_scale"]
    table = aggregate(records, metrics)
    assert table[0]["eval_t2i_R@1"] == (15.0, pytest.approx(math.sqrt(50)), 2)  # stdev of 10, 20 = sqrt(50)
    assert table[1]["eval_t2i_R@1"] == (15.0, 0.0, 1)  # the NaN run is left out of the mean
    assert "logit_scale" not in table[0]
    assert best_variants(table, "eval_t2i_R@1") == {"a", "b"}  # a tie marks both
    assert best_variants(table, "eval_t2i_median_rank") == {"b"}  # lower is better
    assert best_variants(table, "logit_scale") == set()  # not ranked
    md = markdown_table(table, metrics)
    assert "| a | 2 | **15.00 ± 7.07** | 5.00 ± 1.41 | – |" in md
    assert "| b | 2 | **15.00** | **3.00 ± 0.00** | 1.00 ± 0.00 |" in md
