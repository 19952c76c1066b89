"""Sharded models. FSDP runs on this CPU only as PyTorch's FSDP2 (`fully_shard`, gloo): FSDP1 stops with "FSDP
needs a non-CPU accelerator device", and accelerate (so the Trainer's --fsdp) enables FSDP only for multi-GPU /
accelerator runs. So: two real gloo processes shard MiniClip with FSDP2 along the wrap units accelerate's policy
reads from `_no_split_modules`, and ClipTrainer evaluates, clamps and saves it; the end-to-end `train.py --fsdp`
run (FSDP1 and FSDP2, resume from sharded optimizer state) is written for CUDA and skipped without two GPUs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miniclip.model import MiniClip
from processes import free_port
from test_train import make_caption_set

REPO = Path(__file__).resolve().parent.parent


def wrap_units(model, version: int) -> list[str]:
    """The modules accelerate's transformer_based_wrap policy shards one by one (FSDP2's policy function)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [type(m).__name__ for m in model.modules() if policy(m)]


@pytest.mark.parametrize("name,expected", [("tiny-vit", {"FastResidualAttentionBlock": 4}),
                                           ("tiny-resnet", {"Bottleneck": None, "FastResidualAttentionBlock": 2}),
                                           ("tiny-chinese-vit", {"FastResidualAttentionBlock": 2, "BertLayer": 2})])
def test_wrap_units_are_the_towers_blocks(name, expected):
    model = MiniClip(name)
    units = wrap_units(model, version=2)
    blocks = {cls: sum(type(m).__name__ == cls for m in model.modules()) for cls in expected}
    assert set(units) == set(expected)
    for cls, count in expected.items():
        assert units.count(cls) == blocks[cls] and (count is None or count == blocks[cls]), (cls, units)


def test_a_policy_naming_open_clips_block_class_finds_nothing_after_the_swap():
    """The batch-first blocks are FastResidualAttentionBlock (attention.py): naming open_clip's class by hand is
    refused by accelerate, which is why _no_split_modules names the swapped class."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["ResidualAttentionBlock"])
    with pytest.raises(ValueError, match="Could not find the transformer layer class ResidualAttentionBlock"):
        fsdp2_prepare_auto_wrap_policy(plugin, MiniClip("tiny-vit"))


SHARDED_SCRIPT = """
import json, sys, copy
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[3])
from test_fsdp import wrap_units
from miniclip.data.captions import read_caption_file
from miniclip.evaluation.encode import Encoder, evaluate_retrieval
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.callbacks import MAX_LOGIT_SCALE, clamp_logit_scale
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments
from miniclip.transforms import image_transform
from transformers import default_data_collator
torch.set_num_threads(1)
args = ClipTrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to="none", disable_tqdm=True,
                             per_device_eval_batch_size=4)  # initialises the gloo group (torchrun's environment)
rank = dist.get_rank()
records = read_caption_file(sys.argv[1])
torch.manual_seed(0)
model = MiniClip("tiny-vit")
reference = copy.deepcopy(model).eval()
tokenizer, transform = get_tokenizer(model.config), image_transform(model.config)
expected = evaluate_retrieval(Encoder(reference, transform, tokenizer, device="cpu", progress=False), records)
# what accelerate's fsdp2_prepare_model does: fully_shard every policy unit, then the root
units = [m for m in model.modules() if type(m).__name__ in set(wrap_units(model, 2))]
for unit in units:
    fully_shard(unit)
fully_shard(model)
assert all(isinstance(p, DTensor) for p in model.parameters())
trainer = ClipTrainer(model, args, eval_dataset=records, processing_class=tokenizer,
                      data_collator=default_data_collator, eval_transform=transform)
got = trainer.evaluate()
with torch.no_grad():
    model.logit_scale.logit_scale.fill_(5.0)  # above ln 100, on whichever process holds it
clamp_logit_scale(model)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    trainer._save(sys.argv[2], state_dict=full)
    loaded = MiniClip.from_pretrained(sys.argv[2]).state_dict()
    want = reference.state_dict()
    worst = max((loaded[k] - want[k]).abs().max().item() for k in want if k != "logit_scale.logit_scale")
    json.dump({"expected": expected, "got": got, "units": len(units), "worst": worst,
               "scale": loaded["logit_scale.logit_scale"].item(), "scale_shape": list(loaded["logit_scale.logit_scale"].shape),
               "max": MAX_LOGIT_SCALE}, open(sys.argv[2] + "/result.json", "w"))
# --fsdp in a CPU run: accelerate leaves FSDP off (the run would be plain DDP), and ClipTrainer says so
try:
    fsdp_args = ClipTrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to="none", fsdp=True,
                                      fsdp_config={"version": 2})
    ClipTrainer(MiniClip("tiny-vit"), fsdp_args)
    refused = None
except ValueError as e:
    refused = str(e)
if rank == 0:
    json.dump({"refused": refused}, open(sys.argv[2] + "/refused.json", "w"))
dist.destroy_process_group()
"""


def test_fsdp2_sharded_model_evaluates_clamps_and_saves_a_full_folder(tmp_path):
    """Two gloo processes, MiniClip sharded by FSDP2: retrieval on the sharded model equals the unsharded
    model's, the clamp reaches the sharded temperature, and the gathered state saves as a miniclip folder that
    from_pretrained loads with the original weights."""
    caption_file = make_caption_set(tmp_path / "data", n=8)
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(caption_file), str(tmp_path / "out"),
                          str(REPO / "tests")], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["units"] == 4
    for key, value in result["expected"].items():
        assert result["got"][f"eval_{key}"] == pytest.approx(value, abs=1e-6), key
    assert result["scale"] == pytest.approx(result["max"]) and result["scale_shape"] == []
    assert result["worst"] == 0.0
    refused = json.loads((tmp_path / "out" / "refused.json").read_text())["refused"]
    assert refused is not None and "accelerate did not enable FSDP" in refused


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: FSDP1 on CPU stops with 'FSDP needs "
                    "a non-CPU accelerator device', and accelerate enables FSDP only for multi-GPU runs")
@pytest.mark.parametrize("version", [1, 2])
def test_train_py_with_fsdp_on_two_gpus_saves_full_folders_and_resumes(tmp_path, version):
    from safetensors.torch import load_file
    train_file = make_caption_set(tmp_path / "data", n=16)
    flags = ["--model_config", "tiny-vit", "--train_file", str(train_file), "--validation_file", str(train_file),
             "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "6",
             "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3",
             "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--init_logit_scale", "5",
             "--fsdp", "true", "--fsdp_config", json.dumps({"version": version, "auto_wrap_policy":
                                                            "TRANSFORMER_BASED_WRAP"})]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), str(REPO / "train.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([*launch, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "out"
    model = MiniClip.from_pretrained(out)  # a full miniclip folder
    assert model.logit_scale.logit_scale.item() <= 4.6052  # clamped on the sharded parameter
    assert json.loads((out / "eval_results.json").read_text())["eval_mean_recall"] >= 0
    final = load_file(out / "model.safetensors")
    resumed = subprocess.run([*launch, *flags, "--output_dir", str(tmp_path / "resumed"),
                              "--resume_from_checkpoint", str(out / "checkpoint-3")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert max((final[k].float() - again[k].float()).abs().max().item() for k in final) <= 1e-4
