"""training/throughput.py and the trainer's bookkeeping: model FLOPs (against torch's FlopCounterMode and a formula
by hand), total_flos / samples/s / MFU in the real Trainer's logs, gradient checkpointing (equal gradients, less
memory held for backward, ResNet refused by name), fp16 (GradScaler + logit-scale clamp) and torch_compile."""
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from miniclip.loss import ClipLoss
from miniclip.training.throughput import TrainingFlops, gpu_peak, measure_matmul_flops, peak_flops
from test_trainer import TensorPairs, _model, _trainer


def _batch(model, n=4, length=12):
    g = torch.Generator().manual_seed(0)
    size = model.config.vision_cfg.image_size
    input_ids = torch.randint(1, 1000, (n, length), generator=g)
    input_ids[:, -1] = model.config.text_cfg.vocab_size - 1 if model.config.text_cfg.tower != "bert" else 102
    return torch.randn(n, 3, size, size, generator=g), input_ids


def _vit_forward_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """Matmul FLOPs of pre-LN transformer blocks over `tokens` positions: q/k/v and output projections
    (8 T W^2), the MLP (4 r T W^2), scores and weighted values (4 T^2 W)."""
    return layers * int(8 * tokens * width ** 2 + 4 * mlp_ratio * tokens * width ** 2 + 4 * tokens ** 2 * width)


def test_flops_equal_the_flop_counter_and_the_formula():
    model = _model("tiny-vit")  # ViT 64 px, patch 16, width 64, 2 layers; text width 64, 2 layers; embed 64
    pixel_values, input_ids = _batch(model, n=1, length=12)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(pixel_values=pixel_values, input_ids=input_ids)
        ((out.image_embeds * out.text_embeds).sum() * out.logit_scale).backward()
    flops = TrainingFlops(model)
    assert flops((3, 64, 64), 12) == counter.get_total_flops()
    patches, width, embed = 16, 64, 64
    conv = 2 * patches * (3 * 16 * 16) * width
    image = conv + _vit_forward_flops(patches + 1, width, 2) + 2 * width * embed
    text = _vit_forward_flops(12, 64, 2) + 2 * 64 * embed
    # backward costs twice the forward, except the patch convolution, whose input (the pixels) needs no gradient
    assert flops((3, 64, 64), 12) == 3 * (image + text) - conv
    assert flops((3, 64, 64), 40) == 3 * (image + _vit_forward_flops(40, 64, 2) + 2 * 64 * embed) - conv


def test_a_locked_tower_costs_its_forward_only():
    model = _model("tiny-vit")
    full = TrainingFlops(model)((3, 64, 64), 12)
    text_only = TrainingFlops(model)(None, 12)
    model.lock_text_tower()
    assert TrainingFlops(model)((3, 64, 64), 12) == full - text_only + text_only // 3


def test_bert_text_tower_is_counted_too():
    model = _model("tiny-chinese-vit")
    pixel_values, input_ids = _batch(model, n=1, length=9)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=input_ids)
        (out.text_embeds.sum() * out.logit_scale).backward()
    assert TrainingFlops(model)(None, 9) == counter.get_total_flops()


def test_trainer_logs_total_flos_samples_per_second_and_mfu(tmp_path):
    model = _model("tiny-vit")
    trainer = _trainer(model, tmp_path, n=8, max_steps=2, per_device_train_batch_size=4)
    trainer.train()
    length = TensorPairs(model.config, 8).tokens["input_ids"].shape[1]
    assert trainer.state.total_flos == 2 * 4 * TrainingFlops(model)((3, 64, 64), length)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["samples_per_second"] > 0 and entry["model_tflops_per_second"] > 0
        assert 0 < entry["mfu"] < 1  # the CPU's peak, measured by a matmul


def test_peak_flops():
    assert peak_flops(torch.device("cpu")) == peak_flops(torch.device("cpu")) > 1e8  # measured once, then cached
    assert measure_matmul_flops(n=256, seconds=0.05) > 1e8
    assert peak_flops(torch.device("meta")) is None
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12 and gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156e12 and gpu_peak("Tesla K80", "fp32") is None


# --- gradient checkpointing ---------------------------------------------------------------------------------------------
def _gradients_and_saved_bytes(model, pixel_values, input_ids):
    """Gradients of the CLIP loss, and the bytes autograd holds for backward (saved tensors outside recomputed
    blocks: what gradient checkpointing cuts)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (BERT) with and without recomputation
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(pixel_values=pixel_values, input_ids=input_ids)
        loss = ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-chinese-vit"])
def test_gradient_checkpointing_equal_gradients_less_memory(name):
    model = _model(name)
    pixel_values, input_ids = _batch(model)
    plain, plain_bytes = _gradients_and_saved_bytes(model, pixel_values, input_ids)
    model.gradient_checkpointing_enable()
    checkpointed, checkpointed_bytes = _gradients_and_saved_bytes(model, pixel_values, input_ids)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
    assert checkpointed_bytes < 0.7 * plain_bytes


def test_gradient_checkpointing_refuses_a_trainable_resnet_by_name():
    model = _model("tiny-resnet")
    with pytest.raises(ValueError, match="image tower \\(open_clip ModifiedResNet\\).*--lock_image"):
        model.gradient_checkpointing_enable()
    model.lock_image_tower()
    model.gradient_checkpointing_enable()  # a locked tower saves no activations: nothing to checkpoint


def test_gradient_checkpointing_through_the_trainer(tmp_path):
    model = _model("tiny-vit")
    trainer = _trainer(model, tmp_path, max_steps=1, gradient_checkpointing=True)
    trainer.train()
    assert model.image_encoder.visual.transformer.grad_checkpointing
    assert model.text_encoder.transformer.grad_checkpointing


# --- precision and compilation ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision (GradScaler) needs a GPU")
def test_fp16_uses_a_grad_scaler_and_keeps_the_scale_clamped(tmp_path):
    model = _model("tiny-vit")
    with torch.no_grad():
        model.logit_scale.logit_scale.fill_(math.log(100) - 1e-4)  # at the clamp: one step up must come back
    trainer = _trainer(model, tmp_path, max_steps=3, fp16=True, learning_rate=1e-2, use_cpu=False)
    trainer.train()
    assert trainer.accelerator.scaler is not None and trainer.accelerator.mixed_precision == "fp16"
    assert model.logit_scale.logit_scale.item() <= math.log(100) + 1e-6
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16=True on a CPU.*--bf16"):
        _trainer(_model("tiny-vit"), tmp_path, fp16=True)


def test_torch_compile_trains_like_eager(tmp_path):
    runs = {}
    for compiled in (False, True):
        model = _model("tiny-vit")
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = _trainer(model, tmp_path / str(compiled), max_steps=2, **extra)
        trainer.train()
        runs[compiled] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert runs[True] == pytest.approx(runs[False], abs=1e-4)


FAULTS_SCRIPT = """
import resource, sys, torch
from miniclip.loss import ClipLoss
from miniclip.model import MiniClip
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments
torch.manual_seed(0)
model, loss = MiniClip("TinyCLIP-ViT-40M-32-Text-19M"), ClipLoss()
ClipTrainer(model, ClipTrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to=[],
                                         keep_freed_memory=sys.argv[1] == "kept"))  # sets the allocator, or not
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
pixel_values, input_ids = torch.randn(4, 3, 224, 224), torch.randint(1, 49000, (4, 20))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=pixel_values, input_ids=input_ids)
        loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_each_step(tmp_path):
    """A real bf16 training step of TinyCLIP-ViT-40M (batch 4) after ClipTrainer is built: with
    --keep_freed_memory false (glibc's defaults) its gradients and activations arrive as fresh pages each step (the
    101 MB token-embedding gradient alone is 25k); with the default they come from the kept heap."""
    import subprocess
    import sys
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_SCRIPT)
    faults = {}
    for mode in ("default", "kept"):
        run = subprocess.run([sys.executable, str(script), mode, str(tmp_path / mode)], capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
        assert run.returncode == 0, run.stderr[-2000:]
        faults[mode] = int(run.stdout.split()[-1])
    assert faults["default"] > 20_000 and faults["kept"] * 10 < faults["default"], faults
