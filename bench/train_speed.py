"""Training throughput and peak memory: miniclip vs open_clip's own loop vs transformers' CLIPModel, side by side.

Same config, batch, threads, precision and captions for all; each measurement runs in a fresh subprocess (its peak
memory is its own) and implementations are interleaved within each repetition. One step = forward + loss +
backward + AdamW step + zero_grad, each project's way:
  miniclip      MiniClip(**collated batch) + miniclip.loss.ClipLoss, text trimmed to the longest caption
                (data.trim_tokens, what ClipCollator does), fused AdamW (the HF Trainer's default optimizer),
                glibc told to keep freed memory (throughput.keep_freed_memory, which ClipTrainer sets);
  open_clip     open_clip.model.CLIP + open_clip.loss.ClipLoss, text padded to 77 by open_clip's tokenizer,
                torch.optim.AdamW with its defaults (what open_clip's training script builds);
  transformers  CLIPModel(return_loss=True), text padded to the longest caption, torch.optim.AdamW defaults.
Ablations (--ablations) switch one miniclip lever back: +mha (open_clip's nn.MultiheadAttention blocks), +pad77
(no trimming), +plainadam (torch.optim.AdamW defaults); +trainer runs the same step through the real
ClipTrainer.train (its overhead), +trainer+glibc with --keep_freed_memory false (glibc's default allocator: measured
through the Trainer because a bare step's first repetition counts FLOPs, which primes glibc's adaptive thresholds);
+compile adds torch.compile (warm-up column = compile time).

    python bench/train_speed.py --config TinyCLIP-ViT-40M-32-Text-19M --batch 16 --steps 5 --reps 3
    python bench/train_speed.py --device cuda --config OpenAI-ViT-B-16 --batch 256 --precisions bf16   # GPU
    python bench/train_speed.py --device cuda --batch max --precisions bf16   # the largest batch all peers fit
A peer that fails (out of GPU memory, say) shows as "failed: <its error>" in its row; the others still run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (bench_main, captions, fmt, interleave, markdown_table, median, peak_rss_mb,  # noqa: E402
                          run_worker, spread, try_worker)

IMPLS = ("miniclip", "open_clip", "transformers")
ABLATIONS = ("miniclip+trainer", "miniclip+trainer+glibc", "miniclip+mha", "miniclip+pad77", "miniclip+plainadam")
def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, part) from miniclip's own datasheet table (training/throughput.py, the one the training
    logs use), or None when the GPU is not listed. MFU is reported against both this figure and the peak this script
    measures with a large matmul (what the GPU really sustains at its clocks and power limit)."""
    from miniclip.training.throughput import gpu_datasheet
    found = gpu_datasheet(device_name)
    return (found[0]["bf16"], found[1]) if found else None


def hf_clip_model(config):
    """transformers' CLIPModel with the same tower sizes as `config` (random init)."""
    from transformers import CLIPConfig, CLIPModel
    v, t = config.vision_cfg, config.text_cfg
    act = "quick_gelu" if config.quick_gelu else "gelu"
    hf_config = CLIPConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio), num_attention_heads=t.heads,
                         num_hidden_layers=t.layers, max_position_embeddings=t.context_length,
                         vocab_size=t.vocab_size, hidden_act=act, eos_token_id=t.vocab_size - 1),
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                           num_attention_heads=v.width // v.head_width, num_hidden_layers=v.layers,
                           image_size=v.image_size, patch_size=v.patch_size, hidden_act=act),
        projection_dim=config.embed_dim)
    return CLIPModel(hf_config)


def build(impl: str, config, batch: int, device):
    """-> (model, loss_fn(model) -> scalar, fused_adamw). Inputs are made once; every step reuses them."""
    import torch
    from miniclip.tokenizer import trim_tokens
    from miniclip.tokenizer import get_tokenizer
    base, *opts = impl.split("+")
    g = torch.Generator().manual_seed(0)
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g).to(device)  # (B, 3, S, S)
    tokens = get_tokenizer(config)(captions(batch))  # input_ids (B, 77)
    if base == "miniclip":
        from miniclip.attention import use_fast_attention
        from miniclip.loss import ClipLoss
        from miniclip.model import MiniClip
        from miniclip.training.throughput import keep_freed_memory
        keep_freed_memory()  # as ClipTrainer does
        model, clip_loss = MiniClip(config), ClipLoss()
        if "mha" in opts:
            use_fast_attention(model, enable=False)
        text = tokens if "pad77" in opts else trim_tokens(tokens)
        inputs = {"pixel_values": pixel_values, **{k: v.to(device) for k, v in text.items()}}

        def loss_fn(m):
            out = m(**inputs)
            return clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        return model, loss_fn, "plainadam" not in opts
    if base == "open_clip":
        import open_clip
        model, clip_loss = open_clip.model.CLIP(**config.open_clip_cfg()), open_clip.loss.ClipLoss()
        input_ids = tokens["input_ids"].to(device)  # open_clip always runs all 77 positions

        def loss_fn(m):
            return clip_loss(*m(pixel_values, input_ids))
        return model, loss_fn, False
    if base == "transformers":
        model = hf_clip_model(config)
        text = trim_tokens(tokens)  # padding="longest", as CLIPProcessor does for a batch
        ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)

        def loss_fn(m):
            return m(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, return_loss=True).loss
        return model, loss_fn, False
    raise ValueError(f"unknown implementation {impl!r}; valid: {IMPLS + ABLATIONS + ('miniclip+compile',)}")


def count_flops(model, loss_fn, device, precision: str) -> float:
    """Forward + backward FLOPs of one step (matmuls, convolutions, attention), by torch's FLOP counter. Under the
    step's autocast: the count is the same, the memory is the step's (an fp32 pass at a bf16 batch may not fit)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def trainer_worker(config, precision: str, args, opts: tuple[str, ...] = ()) -> dict:
    """The same miniclip step through the real `ClipTrainer.train` (fixed collated batch, so data loading is left
    to data_speed.py and bench/gpu_busy.py): shows what the Trainer's loop, callbacks and checks add per step. On a
    GPU the batch lives there already (no pinning, no copy): the loop alone."""
    import tempfile

    import torch
    from transformers import TrainerCallback

    from miniclip.tokenizer import trim_tokens
    from miniclip.model import MiniClip
    from miniclip.tokenizer import get_tokenizer
    from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments
    size = config.vision_cfg.image_size
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(args.batch, 3, size, size, generator=g),
              **trim_tokens(get_tokenizer(config)(captions(args.batch)))}
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    on_gpu = args.device == "cuda"
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if on_gpu and state.global_step in (args.warmup, args.warmup + args.steps):
                torch.cuda.synchronize()  # the GPU has finished the steps the CPU has queued
                if state.global_step == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = ClipTrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-5, weight_decay=0.1, bf16=precision == "bf16", use_cpu=not on_gpu,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=not on_gpu,
            keep_freed_memory="glibc" not in opts)
        trainer = ClipTrainer(MiniClip(config), targs, train_dataset=list(range(args.batch * (args.warmup + args.steps))),
                              data_collator=lambda _: dict(inputs), callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1]  # from the end of the last warm-up step to the end of the last
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mb()
    return {"samples_per_s": args.batch * args.steps / seconds, "peak_mb": peak,
            "warmup_s": stamps[args.warmup - 1] - start, "gflop_per_sample": None}


def make_step(impl: str, precision: str, config, batch: int, device, count: bool = False):
    """-> (step(): one forward + backward + AdamW step, FLOPs of a step or None)."""
    import torch
    model, loss_fn, fused = build(impl, config, batch, device)
    model.to(device).train()
    flops = count_flops(model, loss_fn, device, precision) if count else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=fused or None)
    run = torch.compile(model) if impl.endswith("+compile") else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(run)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, flops


def worker(impl: str, precision: str, args) -> dict:
    import torch
    from miniclip.config import load_model_config
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_model_config(args.config)
    if impl.startswith("miniclip+trainer"):
        return trainer_worker(config, precision, args, tuple(impl.split("+")[2:]))
    step, flops = make_step(impl, precision, config, args.batch, device, count=args.count_flops)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):  # allocations, kernel selection, optimizer state, compilation
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"samples_per_s": args.batch * args.steps / seconds, "peak_mb": peak, "warmup_s": warmup_s,
            "gflop_per_sample": flops / args.batch / 1e9 if flops else None}


def largest_batch(impls: list[str], precision: str, args, start: int = 256) -> int:
    """The largest power-of-two batch in [start, args.max_batch] at which two training steps of every one of
    `impls` fit in GPU memory (0 when `start` does not). One process: the first implementation doubles from
    `start`; each later one starts at the batch found so far and halves until it fits."""
    import gc

    import torch
    from miniclip.config import load_model_config
    config, device = load_model_config(args.config), torch.device(args.device)

    def fits(impl: str, batch: int) -> bool:
        step = None
        try:
            step, _ = make_step(impl, precision, config, batch, device)
            step(), step()
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del step
            gc.collect()
            torch.cuda.empty_cache()

    best, batch = 0, start
    while batch <= args.max_batch and fits(impls[0], batch):
        best, batch = batch, batch * 2
    for impl in impls[1:]:
        while best >= start and not fits(impl, best):
            best //= 2
    print(f"  largest batch that fits {', '.join(impls)}: {best if best >= start else 0}", file=sys.stderr)
    return best if best >= start else 0


def matmul_peak(precision: str, threads: int, device: str) -> float:
    """The machine's measured dense matmul rate (FLOP/s) at this precision: the ceiling for model-FLOPs utilisation."""
    import torch
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(5):
        sync()
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < 0.3:
            a @ b
            sync()
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def measure_all(args, script=Path(__file__)) -> dict:
    impls = list(args.impls) + (list(ABLATIONS) if args.ablations else [])
    if args.batch == "max":  # the largest power of two every (bare-step) implementation fits, probed first
        bare = [i for i in impls if i != "miniclip+trainer"]
        probe = ["--probe-batch", args.precisions[0], "--config", args.config, "--device", args.device,
                 "--max-batch", str(args.max_batch), "--threads", str(args.threads), "--impls", *bare]
        args.batch = run_worker(script, probe, args.threads)["batch"]
        args.batch_probed = True
        print(f"largest batch that fits every implementation: {args.batch}", flush=True)
        if not args.batch:
            raise SystemExit("train_speed: not even a batch of 256 fits on this GPU; pass --batch N")
    jobs = [(impl, precision) for precision in args.precisions for impl in impls]
    common = ["--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--threads", str(args.threads), "--device", args.device]

    def measure(job, rep):
        extra = ["--count-flops"] if rep == 0 else []
        return try_worker(script, ["--worker", *job, *common, *extra], args.threads)
    results = interleave(jobs, args.reps, measure)
    peak_runs = {p: run_worker(script, ["--peak", p, *common], args.threads) for p in args.precisions}
    peaks = {p: r["flops"] for p, r in peak_runs.items()}
    return {"results": results, "peaks": peaks, "device_name": next(iter(peak_runs.values()))["name"]}


def summary(measured: dict, args) -> list[dict]:
    """One dict per (precision, implementation): medians, ratios to miniclip, MFU against the measured matmul peak
    and (bf16 on a listed GPU) against the datasheet peak."""
    results, peaks = measured["results"], measured["peaks"]
    sheet = datasheet_peak(measured.get("device_name") or "") if args.device == "cuda" else None
    rows = []
    for (impl, precision), runs in results.items():
        ours = results.get(("miniclip", precision), [])
        speed, mem, gflop = median(runs, "samples_per_s"), median(runs, "peak_mb"), median(runs, "gflop_per_sample")
        our_speed, our_mem = median(ours, "samples_per_s"), median(ours, "peak_mb")
        flops = speed * gflop * 1e9 if speed and gflop else None
        rows.append({
            "precision": precision, "impl": impl, "samples_per_s": speed, "range": spread(runs, "samples_per_s"),
            "speedup": our_speed / speed if our_speed and speed else None, "peak_mb": mem,
            "memory_ratio": our_mem / mem if our_mem and mem else None, "gflop_per_sample": gflop,
            "mfu_measured": 100 * flops / peaks[precision] if flops else None,
            "mfu_datasheet": 100 * flops / (sheet[0] * 1e12) if flops and sheet and precision == "bf16" else None,
            "warmup_s": median(runs, "warmup_s"), "error": next((r["error"] for r in runs if "error" in r), None),
            "batch": args.batch, "config": args.config})
    return rows


def table(measured: dict, args) -> str:
    peaks = measured["peaks"]
    sheet = datasheet_peak(measured.get("device_name") or "") if args.device == "cuda" else None
    rows = []
    for r in summary(measured, args):
        ratio = (lambda v: f"{v:.2f}x" if v else "-")
        speed = fmt(r["samples_per_s"]) if r["samples_per_s"] else f"failed: {r['error']}"
        rows.append([r["precision"], r["impl"], speed, r["range"], ratio(r["speedup"]), fmt(r["peak_mb"], 0),
                     fmt(r["memory_ratio"]), f"{r['gflop_per_sample']:.3g}" if r["gflop_per_sample"] else "-",
                     fmt(r["mfu_measured"], 1), fmt(r["mfu_datasheet"], 1), fmt(r["warmup_s"], 1)])
    mem_kind = "CUDA max allocated" if args.device == "cuda" else "peak RSS of the process"
    batch = f"batch {args.batch}" + (" (the largest power of two that fits every implementation)"
                                     if getattr(args, "batch_probed", False) else "")
    sheet_text = (f" Datasheet dense bf16 peak ({sheet[1]}): {sheet[0]:.0f} TFLOP/s." if sheet else
                  " Datasheet peak: this GPU is not in miniclip.training.throughput.GPU_PEAK_TFLOPS." if args.device == "cuda" else "")
    head = (f"Training, {args.config}, {batch}, {args.device}, {args.threads} threads, median of "
            f"{args.reps} runs x {args.steps} steps. Matmul peak measured: " +
            ", ".join(f"{p} {v / 1e12:.1f} TFLOP/s" for p, v in peaks.items()) + f".{sheet_text} "
            f"Memory: {mem_kind}. MFU = samples/s x the implementation's own FLOPs per sample / peak.\n\n")
    return head + markdown_table(
        ["precision", "implementation", "samples/s", "range", "miniclip / this", "peak MB", "miniclip / this",
         "GFLOP/sample", "MFU % (measured peak)", "MFU % (datasheet)", "warm-up s"], rows)


def _batch(value: str):
    if value == "max":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {value!r}: give a number of samples or 'max'") from None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--batch", type=_batch, default=16, help="samples per step, or 'max' (GPU only): the largest "
                   "power of two from 256 up to --max-batch at which every implementation fits, probed first")
    p.add_argument("--max-batch", type=int, default=8192, help="upper end of the --batch max search")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reps", type=int, default=3, help="repetitions (fresh processes), interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS),
                   help=f"any of {IMPLS + ABLATIONS + ('miniclip+compile',)}")
    p.add_argument("--ablations", action="store_true", help=f"also run {ABLATIONS}")


def _helper_flags(p: argparse.ArgumentParser):
    """Hidden one-shot modes run in fresh processes by measure_all: --peak PRECISION (measured matmul rate),
    --probe-batch PRECISION (largest batch that fits)."""
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak", metavar="PRECISION", help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", metavar="PRECISION", help=argparse.SUPPRESS)

    def handle(args) -> bool:
        if args.batch == "max" and args.device != "cuda":
            raise SystemExit("train_speed: --batch max needs --device cuda (it probes GPU memory)")
        if args.peak:
            import torch
            on_gpu = args.device == "cuda" and torch.cuda.is_available()
            print(json.dumps({"flops": matmul_peak(args.peak, args.threads, args.device),
                              "name": torch.cuda.get_device_name() if on_gpu else "cpu"}))
        elif args.probe_batch:
            print(json.dumps({"batch": largest_batch(args.impls, args.probe_batch, args)}))
        return bool(args.peak or args.probe_batch)
    return handle


def main():
    bench_main(__doc__, add_args, worker, measure_all, table, ("IMPL", "PRECISION"), extra=_helper_flags,
               summary=summary)

if __name__ == "__main__":
    main()
