"""Training throughput and peak memory: miniclip vs open_clip's own loop vs transformers' CLIPModel, side by side.

Same config, batch, threads, precision and captions for all; each measurement runs in a fresh subprocess (its peak
memory is its own) and implementations are interleaved within each repetition. One step = forward + loss +
backward + AdamW step + zero_grad, each project's way:
  miniclip      MiniClip(**collated batch) + miniclip.loss.ClipLoss, text trimmed to the longest caption
                (data.trim_tokens, what ClipCollator does), fused AdamW (the HF Trainer's default optimizer);
  open_clip     open_clip.model.CLIP + open_clip.loss.ClipLoss, text padded to 77 by open_clip's tokenizer,
                torch.optim.AdamW with its defaults (what open_clip's training script builds);
  transformers  CLIPModel(return_loss=True), text padded to the longest caption, torch.optim.AdamW defaults.
Ablations (--ablations) switch one miniclip lever back: +mha (open_clip's nn.MultiheadAttention blocks), +pad77
(no trimming), +plainadam (torch.optim.AdamW defaults); +trainer runs the same step through the real
ClipTrainer.train (its overhead); +compile adds torch.compile (warm-up column = compile time).

    python bench/train_speed.py --config TinyCLIP-ViT-40M-32-Text-19M --batch 16 --steps 5 --reps 3
    python bench/train_speed.py --device cuda --config OpenAI-ViT-B-16 --batch 256 --precisions bf16   # GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (bench_main, captions, fmt, interleave, markdown_table, median, peak_rss_mb,  # noqa: E402
                          run_worker, spread)

IMPLS = ("miniclip", "open_clip", "transformers")
ABLATIONS = ("miniclip+trainer", "miniclip+mha", "miniclip+pad77", "miniclip+plainadam")
# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for model-FLOPs utilisation on GPUs.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


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


def count_flops(model, loss_fn) -> float:
    """Forward + backward FLOPs of one step (matmuls, convolutions, attention), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss_fn(model).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def trainer_worker(config, precision: str, args) -> dict:
    """The same miniclip step through the real `ClipTrainer.train` (fixed collated batch, so data loading is left
    to data_speed.py): shows what the Trainer's loop, callbacks and checks add per step."""
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
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = ClipTrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-5, weight_decay=0.1, bf16=precision == "bf16", use_cpu=args.device == "cpu",
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0)
        trainer = ClipTrainer(MiniClip(config), targs, train_dataset=list(range(args.batch * (args.warmup + args.steps))),
                              data_collator=lambda _: dict(inputs), callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1]  # from the end of the last warm-up step to the end of the last
    return {"samples_per_s": args.batch * args.steps / seconds, "peak_mb": peak_rss_mb(),
            "warmup_s": stamps[args.warmup - 1] - start, "gflop_per_sample": None}


def worker(impl: str, precision: str, args) -> dict:
    import torch
    from miniclip.config import load_model_config
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_model_config(args.config)
    if impl == "miniclip+trainer":
        return trainer_worker(config, precision, args)
    model, loss_fn, fused = build(impl, config, args.batch, device)
    model.to(device).train()
    flops = count_flops(model, loss_fn) if args.count_flops else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=fused or None)
    run = torch.compile(model) if impl.endswith("+compile") else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(run)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    jobs = [(impl, precision) for precision in args.precisions for impl in impls]
    common = ["--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--threads", str(args.threads), "--device", args.device]

    def measure(job, rep):
        extra = ["--count-flops"] if rep == 0 else []
        return run_worker(script, ["--worker", *job, *common, *extra], args.threads)
    results = interleave(jobs, args.reps, measure)
    peaks = {p: run_worker(script, ["--peak", p, *common], args.threads)["flops"] for p in args.precisions}
    return {"results": results, "peaks": peaks}


def table(measured: dict, args) -> str:
    results, peaks = measured["results"], measured["peaks"]
    rows = []
    for precision in args.precisions:
        impls = [i for (i, p) in results if p == precision]
        ours = results.get(("miniclip", precision))
        for impl in impls:
            runs = results[(impl, precision)]
            speed, mem = median(runs, "samples_per_s"), median(runs, "peak_mb")
            gflop = median(runs, "gflop_per_sample")
            mfu = speed * gflop * 1e9 / peaks[precision] * 100 if gflop else None
            rows.append([precision, impl, fmt(speed), spread(runs, "samples_per_s"),
                         f"{median(ours, 'samples_per_s') / speed:.2f}x" if ours else "-", fmt(mem, 0),
                         f"{median(ours, 'peak_mb') / mem:.2f}" if ours else "-", f"{gflop:.3g}" if gflop else "-", fmt(mfu, 1),
                         fmt(median(runs, "warmup_s"), 1)])
    mem_kind = "CUDA max allocated" if args.device == "cuda" else "peak RSS of the process"
    head = (f"Training, {args.config}, batch {args.batch}, {args.device}, {args.threads} threads, median of "
            f"{args.reps} runs x {args.steps} steps. Matmul peak measured: " +
            ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()) + f". Memory: {mem_kind}.\n\n")
    return head + markdown_table(
        ["precision", "implementation", "samples/s", "range", "miniclip / this", "peak MB", "miniclip / this",
         "GFLOP/sample", "MFU %", "warm-up s"], rows)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reps", type=int, default=3, help="repetitions (fresh processes), interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS),
                   help=f"any of {IMPLS + ABLATIONS + ('miniclip+compile',)}")
    p.add_argument("--ablations", action="store_true", help=f"also run {ABLATIONS}")


def _peak_flag(p: argparse.ArgumentParser):
    """--peak PRECISION: print the measured matmul rate (run_all and the MFU column use it)."""
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak", metavar="PRECISION", help=argparse.SUPPRESS)

    def handle(args) -> bool:
        if args.peak:
            print(json.dumps({"flops": matmul_peak(args.peak, args.threads, args.device)}))
        return bool(args.peak)
    return handle


def main():
    bench_main(__doc__, add_args, worker, measure_all, table, ("IMPL", "PRECISION"), extra=_peak_flag)

if __name__ == "__main__":
    main()
