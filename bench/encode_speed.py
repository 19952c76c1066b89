"""Evaluation encode rate (images/s, texts/s) and peak memory: miniclip vs open_clip vs transformers CLIPModel.

The model part of evaluation, on ready tensors (decoding is data_speed.py's job), each project's way:
  miniclip      eval mode, torch.inference_mode, autocast at the precision, captions trimmed to the batch's
                longest (what evaluation.encode_images / encode_texts do), glibc told to keep freed memory (what
                test.py sets: training.throughput.keep_freed_memory);
  open_clip     eval mode, torch.no_grad + autocast (open_clip's zero-shot / retrieval evaluation), text at 77;
  transformers  CLIPModel.get_image_features / get_text_features under no_grad, padding to the longest caption;
  onnxruntime   the same random-init model exported by miniclip.serving.onnx (once, before timing), run by
                onnxruntime's CPU provider with the same thread count, captions trimmed as miniclip's
                (fp32 precision only; onnxruntime-fp16 / onnxruntime-int8 are the exported variants).
Ablations (--ablations): miniclip+bf16w, the model's weights cast to bf16 (no per-call weight casts) for bf16;
miniclip+glibc, glibc's default allocator settings.
Batches: 64 images, 256 captions (evaluation.py's defaults). The full wall time of evaluation on Flickr8k
(decoding, metrics, plots) is bench/eval_speed.py.

    python bench/encode_speed.py --config TinyCLIP-ViT-40M-32-Text-19M --reps 3
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (bench_main, captions, fmt, interleave, markdown_table, median, peak_rss_mb,  # noqa: E402
                          run_worker, spread)

IMPLS = ("miniclip", "open_clip", "transformers", "onnxruntime", "onnxruntime-fp16", "onnxruntime-int8")
ONNX_IMPLS = {"onnxruntime": "fp32", "onnxruntime-fp16": "fp16", "onnxruntime-int8": "int8"}  # impl -> variant
ABLATIONS = ("miniclip+bf16w", "miniclip+glibc")


def build(impl: str, config, device):
    """-> (model, encode_images(pixel_values), encode_texts(list[str]) -> tokenized inputs, encode_tokens)."""
    import torch
    from miniclip.tokenizer import trim_tokens
    from miniclip.tokenizer import get_tokenizer
    tokenizer = get_tokenizer(config)
    base, *opts = impl.split("+")
    if base == "miniclip":
        from miniclip.model import MiniClip
        from miniclip.training.throughput import keep_freed_memory
        if "glibc" not in opts:
            keep_freed_memory()
        model = MiniClip(config)
        if "bf16w" in opts:
            model = model.to(torch.bfloat16)
        tokens = trim_tokens(tokenizer(captions(256)))["input_ids"].to(device)
        return model, lambda x: model.encode_image(x.to(next(model.parameters()).dtype)), \
            lambda: model.encode_text(tokens), torch.inference_mode
    if base == "open_clip":
        import open_clip
        model = open_clip.model.CLIP(**config.open_clip_cfg())
        tokens = tokenizer(captions(256))["input_ids"].to(device)  # (256, 77)
        return model, model.encode_image, lambda: model.encode_text(tokens), torch.no_grad
    if base == "transformers":
        from bench.train_speed import hf_clip_model
        model = hf_clip_model(config)
        text = trim_tokens(tokenizer(captions(256)))
        ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
        return (model, lambda x: model.get_image_features(pixel_values=x),
                lambda: model.get_text_features(input_ids=ids, attention_mask=mask), torch.no_grad)
    if base in ONNX_IMPLS:
        from miniclip.serving.onnx import OnnxClip
        served = OnnxClip(build.onnx_dir, ONNX_IMPLS[base], threads=build.threads)
        text = trim_tokens(tokenizer(captions(256)))
        return (served, served.encode_image, lambda: served.encode_text(text["input_ids"], text["attention_mask"]),
                torch.inference_mode)
    raise ValueError(f"unknown implementation {impl!r}; valid: {IMPLS + ABLATIONS}")


def worker(impl: str, precision: str, args) -> dict:
    import torch
    from miniclip.config import load_model_config
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_model_config(args.config)
    build.onnx_dir, build.threads = args.onnx_dir, args.threads
    model, encode_images, encode_texts, no_grad = build(impl, config, device)
    if impl not in ONNX_IMPLS:
        model.to(device).eval()
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(args.image_batch, 3, size, size).to(device)  # (64, 3, S, S)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    use_autocast = precision == "bf16" and not impl.endswith("+bf16w")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    rates = {}
    with no_grad(), autocast:
        for name, fn, n in (("images_per_s", lambda: encode_images(pixel_values), args.image_batch),
                            ("texts_per_s", encode_texts, 256)):
            fn()  # warm-up
            sync()
            start = time.perf_counter()
            for _ in range(args.batches):
                fn()
            sync()
            rates[name] = n * args.batches / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {**rates, "peak_mb": peak}


def export_for_onnxruntime(args, directory: str) -> None:
    """The random-init model every worker builds (seed 0), exported once with the variants asked for."""
    import torch
    from miniclip.model import MiniClip
    from miniclip.serving.onnx import export_onnx
    torch.manual_seed(0)
    wanted = {"fp32", *(ONNX_IMPLS[i] for i in args.impls if i in ONNX_IMPLS)}
    variants = [v for v in ("fp32", "fp16", "int8") if v in wanted]
    export_onnx(MiniClip(args.config).eval(), directory, variants=variants)


def measure_all(args, script=Path(__file__)) -> dict:
    import tempfile
    impls = list(args.impls) + (list(ABLATIONS) if args.ablations else [])
    jobs = [(i, p) for p in args.precisions for i in impls
            if not (i.endswith("+bf16w") and p != "bf16") and not (i in ONNX_IMPLS and p != "fp32")]
    onnx_dir = tempfile.mkdtemp(prefix="encode-speed-onnx-")
    if any(i in ONNX_IMPLS for i, _ in jobs):
        export_for_onnxruntime(args, onnx_dir)
    common = ["--config", args.config, "--batches", str(args.batches), "--threads", str(args.threads),
              "--device", args.device, "--image-batch", str(args.image_batch), "--onnx-dir", onnx_dir]
    try:
        return interleave(jobs, args.reps, lambda job, rep: run_worker(script, ["--worker", *job, *common], args.threads))
    finally:
        shutil.rmtree(onnx_dir, ignore_errors=True)


def table(results: dict, args) -> str:
    rows = []
    for precision in args.precisions:
        ours = results.get(("miniclip", precision))
        for impl in [i for (i, p) in results if p == precision]:
            runs, row = results[(impl, precision)], [precision, impl]
            for key in ("images_per_s", "texts_per_s", "peak_mb"):
                value = median(runs, key)
                row += [fmt(value, 0 if key == "peak_mb" else 1), spread(runs, key) if key != "peak_mb" else "",
                        f"{median(ours, key) / value:.2f}" if ours else "-"]
            rows.append([c for c in row if c != ""])
    head = (f"Evaluation encode, {args.config}, {args.device}, {args.threads} threads, batches of {args.image_batch} "
            f"images / 256 captions, median of {args.reps} runs x {args.batches} batches.\n\n")
    return head + markdown_table(["precision", "implementation", "images/s", "range", "miniclip / this", "texts/s",
                                  "range", "miniclip / this", "peak MB", "miniclip / this"], rows)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="TinyCLIP-ViT-40M-32-Text-19M")
    p.add_argument("--batches", type=int, default=3, help="timed batches per measurement")
    p.add_argument("--image-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), help=f"any of {IMPLS + ABLATIONS}")
    p.add_argument("--ablations", action="store_true", help=f"also run {ABLATIONS}")
    p.add_argument("--onnx-dir", help=argparse.SUPPRESS)  # set by measure_all for the onnxruntime workers


def main():
    bench_main(__doc__, add_args, worker, measure_all, table, ("IMPL", "PRECISION"))

if __name__ == "__main__":
    main()
