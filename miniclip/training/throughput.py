"""Training throughput: model FLOPs per step (torch's FlopCounterMode over a meta-device copy, once per input shape),
the device's peak FLOP/s (a table of datasheet numbers for GPUs, measured once by a matmul on a CPU) and model FLOPs
utilisation, MFU = achieved model FLOP/s / peak (Chowdhery et al. 2022, PaLM, appendix B); `keep_freed_memory`, the
allocator setting that keeps a CPU step from page-faulting.

Leaves out on purpose: hardware FLOPs (the recomputation of gradient checkpointing is not counted, as MFU defines),
element-wise ops (FlopCounterMode counts matmuls, convolutions and attention, which dominate) and the loss's B x B
logits (negligible next to the towers).
"""
from __future__ import annotations

import ctypes
import re
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from miniclip.model import MiniClip

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets per precision: fp32 (CUDA cores), tf32 and 16-bit
# (bf16 = fp16) on tensor cores. Matched against torch.cuda.get_device_name() in this order, the first match winning
# ("H100 PCIe" before "H100"). bench/train_speed.py reads its bf16 column too.
GPU_PEAK_TFLOPS = (
    (r"\bGH200\b", "GH200 (H100 SXM-class)", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0}),
    (r"\bH200 NVL\b", "H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    (r"\bH200\b", "H200 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0}),
    (r"\bH100 PCIe\b", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0}),
    (r"\bH100 NVL\b", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    (r"\bH100\b", "H100 SXM", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.0}),
    (r"\bA100\b", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    (r"\bL40S\b", "L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
)
_cpu_peak: dict[torch.dtype, float] = {}


class TrainingFlops:
    """Forward + backward FLOPs per (image, caption) pair of a MiniClip, for the parameters that require grad (a
    locked tower costs its forward only). The image tower is counted once per image shape; the text tower at 1, 2
    and 3 tokens, extended exactly to any length, since a transformer's FLOPs are a quadratic in its length
    (projections and MLP linear, attention scores quadratic): batches trimmed to their longest caption cost no
    recount. Counted on a meta-device copy (no memory, no compute), or a CPU copy for towers with data-dependent
    steps (BERT's attention-mask checks read values)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._cache: dict = {}  # (what, trainable names) -> FLOPs / text coefficients
        self._skeleton = None

    def __call__(self, pixel_shape: tuple | None, text_length: int | None) -> int:
        """pixel_shape (3, S, S) of one image, text_length L of one caption; None for a tower not run."""
        trainable = frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)
        total = 0
        if pixel_shape is not None:
            key = ("image", tuple(pixel_shape), trainable)
            if key not in self._cache:
                self._cache[key] = self._count(trainable, pixel_values=torch.zeros((1, *pixel_shape)))
            total += self._cache[key]
        if text_length is not None:
            key = ("text", trainable)
            if key not in self._cache:
                f1, f2, f3 = (self._count(trainable, input_ids=torch.ones((1, n), dtype=torch.long)) for n in (1, 2, 3))
                c2 = (f3 - 2 * f2 + f1) // 2  # second difference / 2
                c1 = f2 - f1 - 3 * c2
                self._cache[key] = (f1 - c1 - c2, c1, c2)
            c0, c1, c2 = self._cache[key]
            total += c0 + c1 * text_length + c2 * text_length ** 2
        return total

    def _count(self, trainable: frozenset, **inputs) -> int:
        skeleton = self._copy()
        device = next(skeleton.parameters()).device
        for name, p in skeleton.named_parameters():
            p.requires_grad_(name in trainable)
        counter = FlopCounterMode(display=False)
        with counter:
            out = skeleton(**{k: v.to(device) for k, v in inputs.items()})
            embeds = out.image_embeds if out.image_embeds is not None else out.text_embeds  # (1, D)
            loss = embeds.sum() * out.logit_scale
            if loss.requires_grad:
                loss.backward()
        skeleton.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def _copy(self) -> MiniClip:
        if self._skeleton is None:
            with torch.device("meta"):
                skeleton = MiniClip(self.model.config)
            try:  # a trial run: BERT's mask handling needs real values
                with torch.no_grad():
                    skeleton(input_ids=torch.ones((1, 2), dtype=torch.long, device="meta"))
            except (RuntimeError, NotImplementedError):  # "Tensor.item() cannot be called on meta tensors"
                skeleton = MiniClip(self.model.config)
            self._skeleton = skeleton.train()
        return self._skeleton


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """Peak FLOP/s of one device at the training precision (dtype None: fp32): the table for known GPUs, a measured
    matmul rate on CPU (once per dtype), None for anything else."""
    dtype = dtype or torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = "bf16" if dtype in (torch.bfloat16, torch.float16) else (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        return gpu_peak(name, precision)
    if device.type == "cpu":
        if dtype not in _cpu_peak:
            _cpu_peak[dtype] = measure_matmul_flops(dtype)
        return _cpu_peak[dtype]
    return None


def gpu_peak(device_name: str, precision: str) -> float | None:
    """Dense datasheet FLOP/s of a GPU by its torch.cuda.get_device_name() at "fp32", "tf32" or "bf16"; None if
    the part is not in GPU_PEAK_TFLOPS."""
    found = gpu_datasheet(device_name)
    return found[0][precision] * 1e12 if found else None


def gpu_datasheet(device_name: str) -> tuple[dict, str] | None:
    """({precision: TFLOP/s}, part) of the first GPU_PEAK_TFLOPS row matching a torch.cuda.get_device_name()."""
    for pattern, part, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks, part
    return None


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """The best FLOP/s of n x n matmuls on this CPU over about `seconds` (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, kernel choice
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


# glibc mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to the kernel.

    By default glibc serves large blocks with fresh mmap()s (the threshold rises as blocks are freed, but never past
    32 MiB, so the 101 MB dense gradient of a 49408 x 512 token embedding is always a new mapping) and trims the heap
    top, so each step's gradients and activations arrive as new pages the kernel must fault in and zero: 40k-55k
    page faults and about 0.1 s of system time per TinyCLIP-ViT-40M bf16 step at batch 16 on 2 CPU threads. With
    no mmap and no trimming (mallopt(3): M_MMAP_MAX 0, M_TRIM_THRESHOLD -1) they come from the kept heap: under
    2k faults, 1.21x the steps of ClipTrainer.train, the same peak memory (bench/train_speed.py, ablation
    `miniclip+trainer+glibc`).
    A process-wide setting for a process that trains; returns False where the C library is not glibc (no-op)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


class ThroughputMeter:
    """samples/s, model TFLOP/s and MFU over the interval since the previous training log."""

    def __init__(self):
        self.last: tuple[float, float, int] | None = None  # (time, total_flos, global_step)

    def measure(self, total_flos: float, global_step: int, samples_per_step: int, peak: float | None,
                start_time: float | None = None) -> dict[str, float]:
        now = time.time()
        then, flos, step = self.last if self.last is not None else (start_time or now, 0.0, 0)
        self.last = (now, total_flos, global_step)
        elapsed = now - then
        if elapsed <= 0 or global_step <= step:
            return {}
        logs = {"samples_per_second": round((global_step - step) * samples_per_step / elapsed, 2)}
        if total_flos > flos:
            achieved = (total_flos - flos) / elapsed
            logs["model_tflops_per_second"] = float(f"{achieved / 1e12:.4g}")
            if peak:
                logs["mfu"] = float(f"{achieved / peak:.4g}")
        return logs
