"""Evaluating or probing a CLIP checkpoint: `python test.py ...` and the `miniclip-eval` console script (the
tutorial's test script, grown up; not the test suite, which is tests/).

  python test.py --checkpoint out/ --image dog.png --texts "a dog" "a cat" "a fish" "a pig"
  python test.py --checkpoint out/ --eval_file data/en_test.json --save_features feats/
  python test.py --checkpoint out/ --zeroshot_dir cifar10-test/ [--class_map names.json]
  python test.py args.json   (the same arguments as a JSON / YAML file)

Prints tables; saves PNGs (similarity heatmap, retrieval grid) and results.json under --output_dir. Leaves out on
purpose: multi-process evaluation (the trainer's `evaluate()` covers training runs).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.checkpoints import load_model_and_tokenizer
from miniclip.config import check_literal
from miniclip.data.captions import BadSamplePolicy, CaptionFileOptions, read_caption_file
from miniclip.evaluation.encode import Encoder, flatten_captions
from miniclip.evaluation.feature_cache import cached_features, files_fingerprint, model_fingerprint, texts_fingerprint
from miniclip.evaluation.metrics import first_caption_indices, first_caption_retrieval, retrieval_metrics, zeroshot_metrics
from miniclip.evaluation.metrics import per_class_accuracy
from miniclip.evaluation.plots import retrieval_grid, similarity_heatmap
from miniclip.evaluation.zeroshot import TemplateSet, get_templates, read_image_folder, zeroshot_classifier
from miniclip.files import atomic_write_json
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.throughput import keep_freed_memory
from miniclip.transforms import image_transform

logger = logging.getLogger("miniclip.evaluate")
Device = Literal["auto", "cpu", "cuda", "mps"]
Engine = Literal["torch", "onnxruntime"]


@dataclass
class TestArguments(CaptionFileOptions):
    checkpoint: str | None = field(default=None, metadata={"help": "Anything the loader takes: a miniclip output "
                                                           "dir, an open_clip / HF / Chinese-CLIP checkpoint."})
    model_config: str | None = field(default=None, metadata={"help": "Instead of --checkpoint: a model config name "
                                                             "(e.g. tiny-vit), randomly initialised (for development)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisation with --model_config."})
    image: str | None = field(default=None, metadata={"help": "Single-image check: the image file."})
    texts: list[str] | None = field(default=None, metadata={"help": "Single-image check: the candidate texts."})
    eval_file: str | None = field(default=None, metadata={"help": "Caption file (JSON / JSONL / CSV) for retrieval."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the eval file's image paths are relative "
                                                           "to (default: the eval file's folder)."})
    on_bad: str = field(default="error", metadata={"help": "Bad caption-file entries: error or skip."})
    zeroshot_dir: str | None = field(default=None, metadata={"help": "Image folder, one subfolder per class."})
    class_map: str | None = field(default=None, metadata={"help": 'JSON {"folder": "class name"} for the prompts.'})
    templates: str = field(default="auto", metadata={"help": "Prompt templates: auto (Chinese for Chinese-CLIP, "
                                                     "else English), english (CLIP's 80), chinese, simple."})
    save_features: str | None = field(default=None, metadata={"help": "Folder to save features to, and reuse them "
                                                              "from on the next run (same model and data only)."})
    overwrite_features: bool = field(default=False, metadata={"help": "Recompute features whose cache does not match."})
    output_dir: str = field(default="test_output", metadata={"help": "Where PNGs and results.json go."})
    batch_size: int = field(default=256, metadata={"help": "Images per batch (large batches amortise per-call "
                                                    "overhead on CPU: 2x faster than 64 on CIFAR-10)."})
    text_batch_size: int = field(default=256, metadata={"help": "Texts per batch."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (CPU or GPU)."})
    engine: str = field(default="torch", metadata={"help": (
        "What runs the towers: torch, or onnxruntime (CPU, fp32): the model is exported once to "
        "OUTPUT_DIR/onnx/ (its error against PyTorch measured and checked, as miniclip-export does) and encoded "
        "by onnxruntime, about 1.9x PyTorch's fp32 images/s and texts/s on a CPU (bench/encode_speed.py). Needs "
        "pip install miniclip[serve].")})
    draft_decode: bool = field(default=False, metadata={"help": (
        "Decode JPEGs at a reduced scale (libjpeg DCT scaling, both sides >= the model's image size): several times "
        "faster, but the pixels differ slightly from the reference transforms' full decode, so the numbers are not "
        "comparable with published ones (CLIP_benchmark decodes in full). Off by default.")})
    grid_queries: int = field(default=6, metadata={"help": "Queries shown in the retrieval grid PNG."})
    grid_k: int = field(default=5, metadata={"help": "Images per query in the retrieval grid PNG."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars (--no_progress to hide)."})
    keep_freed_memory: bool = field(default=True, metadata={"help": (
        "On Linux (glibc), keep freed memory in the process's heap, as train.py does, so each batch's activations "
        "do not come back as fresh pages to fault in (texts encode 1.2-1.5x faster: bench/encode_speed.py, "
        "ablation miniclip+glibc). False = glibc's defaults.")})

    def __post_init__(self):
        check_literal(self.templates, TemplateSet, "templates")
        check_literal(self.device, Device, "device")
        check_literal(self.on_bad, BadSamplePolicy, "on_bad")
        check_literal(self.engine, Engine, "engine")
        if self.engine == "onnxruntime" and (self.bf16 or self.device not in ("auto", "cpu")):
            raise ValueError("--engine onnxruntime runs fp32 on the CPU: drop --bf16 and --device "
                             f"{self.device} (or use --engine torch)")
        if (self.checkpoint is None) == (self.model_config is None):
            raise ValueError("give exactly one of --checkpoint (a trained model) or --model_config (random init)")
        if not (self.image or self.eval_file or self.zeroshot_dir):
            raise ValueError("nothing to do: give --image with --texts, --eval_file, and/or --zeroshot_dir")
        if (self.image is None) != (not self.texts):
            raise ValueError("--image and --texts go together: --image dog.png --texts 'a dog' 'a cat'")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {self.batch_size} / {self.text_batch_size}")


def parse_args(argv: list[str] | None) -> TestArguments:
    return parse_dataclass(TestArguments, argv)


def load_model(args: TestArguments):
    if args.model_config is not None:
        torch.manual_seed(args.seed)
        model = MiniClip(args.model_config)
        tokenizer = get_tokenizer(model.config)
    else:
        model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, torch.device(device)


def onnxruntime_encoder(model: MiniClip, fingerprint: str, tokenizer, folder: Path, settings: dict) -> Encoder:
    """An Encoder over fp32 ONNX graphs of `model` (whose `model_fingerprint` is `fingerprint`) in `folder`: exported
    there (and checked against PyTorch) unless the folder holds a complete export of the same weights, reused."""
    from miniclip.serving.onnx import ONNX_CONFIG, export_onnx, onnx_encoder
    marker = folder / "exported_from.json"
    same = marker.is_file() and json.loads(marker.read_text()) == {"model": fingerprint}
    if same and (folder / ONNX_CONFIG).is_file():
        logger.info("reusing the onnxruntime export of these weights in %s", folder)
    else:
        start = time.perf_counter()
        marker.unlink(missing_ok=True)
        export_onnx(model, folder, variants=["fp32"], tokenizer=tokenizer)
        atomic_write_json(marker, {"model": fingerprint})
        logger.info("exported the towers to %s for onnxruntime in %.1f s", folder, time.perf_counter() - start)
    return onnx_encoder(folder, "fp32", **settings)


class Runner:
    """The model, its preprocessing and the caching of features, shared by the three tasks."""

    def __init__(self, args: TestArguments):
        self.args = args
        model, tokenizer, device = load_model(args)
        self.model, self.tokenizer = model, tokenizer
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._fingerprint = None
        settings = dict(image_batch_size=args.batch_size, text_batch_size=args.text_batch_size, progress=args.progress,
                        draft_size=model.config.vision_cfg.image_size if args.draft_decode else None)
        if args.engine == "onnxruntime":
            self._fingerprint = model_fingerprint(model)
            self.encoder = onnxruntime_encoder(model.cpu(), self._fingerprint, tokenizer, self.output_dir / "onnx",
                                               settings)
        else:
            self.encoder = Encoder(model, image_transform(model.config), tokenizer, device=device,
                                   dtype=torch.bfloat16 if args.bf16 else None, **settings)

    def _key(self, kind: str, data: str) -> dict:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return {"kind": kind, "model": self._fingerprint, "config": self.model.config.to_dict(),
                "dtype": str(self.encoder.dtype), "data": data} | (
                    {"engine": self.args.engine} if self.args.engine != "torch" else {})

    def images(self, paths: list[Path], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_kept, D) embeddings and the kept indices; unreadable files are skipped with a count."""
        a = self.args
        key = self._key("images", files_fingerprint(paths)) | {"transform": repr(self.encoder.transform),
                                                              "draft_size": self.encoder.draft_size} \
            if a.save_features else {}

        def compute():
            embeds, kept = self.encoder.image_files(paths, skip_unreadable=True)
            return {"image_embeds": embeds, "kept": kept}

        out = cached_features(a.save_features, f"{name}_images", key, compute, a.overwrite_features)
        if len(out["kept"]) < len(paths):
            print(f"skipped {len(paths) - len(out['kept'])} unreadable image(s) of {len(paths)}")
        return out["image_embeds"], out["kept"]

    def texts(self, texts: list[str], name: str) -> torch.Tensor:
        a = self.args
        key = self._key("texts", texts_fingerprint(texts)) | {"tokenizer": self.tokenizer.describe()} \
            if a.save_features else {}
        compute = lambda: {"text_embeds": self.encoder.texts(texts)}  # noqa: E731
        return cached_features(a.save_features, f"{name}_texts", key, compute, a.overwrite_features)["text_embeds"]


def single_image(run: Runner) -> dict:
    """Cosine similarity of the image with each text, and softmax(logit_scale * cos) over the texts, best first."""
    a = run.args
    image_embeds = run.encoder.images([Path(a.image)])  # (1, D)
    text_embeds = run.encoder.texts(a.texts)  # (T, D)
    cosine = (image_embeds @ text_embeds.T)[0]  # (T,)
    probs = (run.model.logit_scale().detach().float().cpu() * cosine).softmax(0)  # (T,)
    order = cosine.argsort(descending=True, stable=True).tolist()
    print(f"\nImage {a.image}  (logit_scale {run.model.logit_scale().item():.2f})")
    print(f"{'rank':>4}  {'cosine':>7}  {'prob':>7}  text")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>4}  {cosine[i].item():7.4f}  {probs[i].item():7.2%}  {a.texts[i]}")
    png = similarity_heatmap(a.image, [a.texts[i] for i in order], cosine[order].tolist(), probs[order].tolist(),
                             run.output_dir / "similarity.png")
    print(f"saved {png}")
    return {"texts": [a.texts[i] for i in order], "cosine": cosine[order].tolist(), "probs": probs[order].tolist()}


def retrieval(run: Runner) -> dict:
    a = run.args
    records = read_caption_file(a.eval_file, a.image_root, on_bad=a.on_bad, **a.caption_file_kwargs())
    name = Path(a.eval_file).stem
    image_embeds, kept = run.images([r.image for r in records], name)
    records = [records[i] for i in kept.tolist()]  # images that could be read, in order
    texts, text_to_image = flatten_captions(records)
    text_embeds = run.texts(texts, name)
    metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image)
    first = first_caption_indices(text_to_image)
    metrics |= first_caption_retrieval(image_embeds, text_embeds[first])
    print(f"\nRetrieval on {a.eval_file}: {len(records)} images, {len(texts)} captions (all captions used)")
    print(f"{'direction':<12} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'median rank':>12}")
    for d, label in (("t2i", "text->image"), ("i2t", "image->text")):
        print(f"{label:<12} {metrics[f'{d}_R@1']:6.2f} {metrics[f'{d}_R@5']:6.2f} {metrics[f'{d}_R@10']:6.2f} "
              f"{metrics[f'{d}_median_rank']:12.0f}")
    print(f"mean recall {metrics['mean_recall']:.2f}")
    print("Tutorial protocol (first caption per image, text->image): " + "  ".join(
        f"top-{k} {metrics[f'first_caption_t2i_R@{k}']:.1f}" for k in (1, 3, 5, 10)))
    # Grid: the first captions of the first few images as queries, their top-k images.
    n = min(a.grid_queries, len(records))
    scores = text_embeds[first[:n]] @ image_embeds.T  # (n, N_img)
    top = scores.topk(min(a.grid_k, len(records)), dim=1).indices.tolist()
    png = retrieval_grid([texts[i] for i in first[:n].tolist()], [[records[j].image for j in row] for row in top],
                         [[j == q for j in row] for q, row in enumerate(top)], run.output_dir / "retrieval_grid.png")
    print(f"saved {png}")
    return metrics


def zeroshot(run: Runner) -> dict:
    a = run.args
    folder = read_image_folder(a.zeroshot_dir, a.class_map)
    templates = get_templates(a.templates, run.model.config)
    classifier = zeroshot_classifier(run.encoder, folder.classnames, templates)  # (C, D)
    image_embeds, kept = run.images(folder.paths, Path(a.zeroshot_dir).resolve().name)
    labels = torch.tensor(folder.labels)[kept]
    metrics = zeroshot_metrics(image_embeds, classifier, labels)
    per_class = per_class_accuracy(image_embeds, classifier, labels)
    print(f"\nZero-shot on {a.zeroshot_dir}: {len(labels)} images, {len(folder.classnames)} classes, "
          f"{len(templates)} templates")
    print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    print(f"{'class':<24} {'top-1 %':>8}")
    for name, acc in zip(folder.classnames, per_class.tolist()):
        print(f"{name[:24]:<24} {acc:8.2f}")
    return metrics | {"per_class_top1": dict(zip(folder.classnames, per_class.tolist())),
                      "skipped_unreadable": len(folder.paths) - len(kept), "ignored_non_images": folder.ignored}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.keep_freed_memory:
        keep_freed_memory()
    run = Runner(args)
    results = {"args": asdict(args)}
    for task, fn in (("single_image", single_image if args.image else None),
                     ("retrieval", retrieval if args.eval_file else None),
                     ("zeroshot", zeroshot if args.zeroshot_dir else None)):
        if fn is not None:
            start = time.perf_counter()
            results[task] = fn(run)
            results[task + "_seconds"] = time.perf_counter() - start
    atomic_write_json(run.output_dir / "results.json", results)
    return results


def cli(argv: list[str] | None = None) -> None:
    """The `miniclip-eval` console script (and `python test.py`)."""
    run_cli(main, argv, prog="test.py")
