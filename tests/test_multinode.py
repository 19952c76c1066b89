"""Two "nodes" on this machine: two torchrun launchers (--nnodes 2, --node_rank 0 / 1, rendezvous on 127.0.0.1,
gloo, one process each) training on streamed shards, against one process with the double batch; checkpoints written
once (a shared filesystem) or on each node (--save_on_each_node); --resume_from_checkpoint latest resolved on the
main node. Each node runs in its own folder with a relative --output_dir, so the two nodes have separate "disks"."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from miniclip.apps import train
from processes import free_port
from test_streaming import make_jpeg_set, write_by_hand

REPO = Path(__file__).resolve().parent.parent
BATCH = 4


def flags(out, shards: Path, **overrides) -> list[str]:
    # adam_epsilon 1e-6: see tests/test_train.py's two-process test (rounding noise on zero gradients)
    values = {"model_config": "tiny-vit", "output_dir": str(out), "train_file": str(shards), "streaming": True,
              "shuffle_buffer": 0, "augment": False, "per_device_train_batch_size": BATCH, "max_steps": 3,
              "learning_rate": 1e-3, "adam_epsilon": 1e-6, "use_cpu": True, "report_to": "none",
              "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "dataloader_num_workers": 0, "seed": 0,
              "disable_tqdm": True, **overrides}
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def two_nodes(tmp_path: Path, shards: Path, **overrides) -> list[Path]:
    """Both launchers at once; each node's folder is its own disk. Returns the nodes' output folders."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   str(REPO / "train.py"), *flags("out", shards, **overrides)]
        log = open(folder / "log.txt", "w")
        runs.append((subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for node, (process, log) in enumerate(runs):
        code = process.wait(timeout=600)
        log.close()
        assert code == 0, (tmp_path / f"node{node}" / "log.txt").read_text()[-4000:]
    return [tmp_path / f"node{node}" / "out" for node in (0, 1)]


def losses(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e and "train_loss" not in e]


def worst(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_two_nodes_match_one_process_and_save_once_or_on_each_node(tmp_path):
    """8 samples in 2 shards: each node streams one shard, one batch of 4 a step; the single process streams both
    with batch 8. Every step's global batch is the whole set in both runs, so gathered negatives make them equal."""
    shards = tmp_path / "shards"
    write_by_hand(make_jpeg_set(tmp_path / "data", n=2 * BATCH), shards, shard_size=BATCH)
    one = train.main(flags(tmp_path / "one", shards, per_device_train_batch_size=2 * BATCH))
    node0, node1 = two_nodes(tmp_path / "shared", shards)
    assert losses(node0) == pytest.approx(losses(tmp_path / "one"), abs=1e-5) and len(losses(node0)) == 3
    assert worst(tmp_path / "one" / "model.safetensors", node0 / "model.safetensors") <= 1e-5
    assert one.trainer.state.global_step == 3
    # a shared filesystem: only the main node writes model, optimizer and stream state; each process adds its own
    # rng_state_<rank>.pth (the Trainer's layout for a shared checkpoint folder)
    assert (node0 / "checkpoint-2" / "stream_state.json").is_file() and (node0 / "model.safetensors").is_file()
    assert sorted(p.name for p in node1.rglob("*") if p.is_file()) == ["rng_state_1.pth"] * 2

    node0, node1 = two_nodes(tmp_path / "each", shards, save_on_each_node=True)
    for node in (node0, node1):  # every node writes its own copy
        assert (node / "checkpoint-2" / "stream_state.json").is_file()
        assert worst(tmp_path / "one" / "model.safetensors", node / "model.safetensors") <= 1e-5

    # latest: node 0 loses its newest checkpoint (3), node 1 keeps it. Resolved on each node, node 1 would resume at
    # step 3 and node 0 at step 2 (and the run would hang in the first gradient all-reduce); resolved on the main
    # node and broadcast, both resume at step 2 and end as the uninterrupted run.
    shutil.rmtree(node0 / "checkpoint-3")
    assert (node1 / "checkpoint-3" / "stream_state.json").is_file()
    for node in (node0, node1):
        (node / "model.safetensors").unlink()
    node0, node1 = two_nodes(tmp_path / "each", shards, save_on_each_node=True, resume_from_checkpoint="latest")
    for node in (0, 1):
        log = (tmp_path / "each" / f"node{node}" / "log.txt").read_text()
        assert "stream resumed from out/checkpoint-2/stream_state.json" in log, log[-3000:]
    assert worst(tmp_path / "one" / "model.safetensors", node1 / "model.safetensors") <= 1e-5
