"""WiSE-FT sweep from the command line: `python -m miniclip.apps.wise_ft` interpolates a zero-shot (pretrained) and a
finetuned checkpoint at each alpha (checkpoints/wise_ft.py), writes each as a miniclip folder, evaluates it on the
given retrieval files and zero-shot folder, and writes a table and the trade-off PNG (target recall against what
the model knew, one point per alpha).

  python -m miniclip.apps.wise_ft --zeroshot pretrained/ --finetuned finetuned/ --alphas 0 0.25 0.5 0.75 1 \\
      --eval_files target_val.json heldout_test.json --zeroshot_dir cifar10-test/ --output_dir wise_ft/

The first --eval_files entry is the target domain (the y axis); the other files and the zero-shot folder are what
the model knew (one panel each). Leaves out on purpose: choosing alpha on the test data for you (the table shows
every alpha; pick on a validation split).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.apps.evaluate import Device
from miniclip.checkpoints import load_model_and_tokenizer, save_pretrained
from miniclip.checkpoints.wise_ft import check_same_architecture, wise_ft
from miniclip.config import check_literal
from miniclip.data.captions import read_caption_file
from miniclip.evaluation.encode import Encoder, evaluate_retrieval
from miniclip.evaluation.plots import wise_ft_tradeoff
from miniclip.evaluation.zeroshot import TemplateSet, evaluate_zeroshot, get_templates, limit_per_class
from miniclip.evaluation.zeroshot import read_image_folder
from miniclip.files import atomic_write_json, atomic_write_text
from miniclip.transforms import image_transform

logger = logging.getLogger("miniclip.wise_ft")


@dataclass
class WiseFtArguments:
    zeroshot: str = field(metadata={"help": "The model before finetuning (any layout the loader reads)."})
    finetuned: str = field(metadata={"help": "The finetuned model (same architecture)."})
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], metadata={"help": (
        "Mixing coefficients: 0 = the zero-shot model, 1 = the finetuned one.")})
    eval_files: list[str] = field(default_factory=list, metadata={"help": (
        "Caption files for retrieval; the first is the target domain, the others held-out.")})
    image_root: str | None = field(default=None, metadata={"help": "Folder the caption files' images are relative "
                                                           "to (default: each file's folder)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N images of each file."})
    zeroshot_dir: str | None = field(default=None, metadata={"help": "Image folder, one subfolder per class."})
    class_map: str | None = field(default=None, metadata={"help": 'JSON {"folder": "class name"} for the prompts.'})
    templates: TemplateSet = field(default="auto", metadata={"help": "auto, english, chinese or simple."})
    zeroshot_per_class: int | None = field(default=None, metadata={"help": "First N images of each class only."})
    output_dir: str = field(default="wise_ft", metadata={"help": "alpha_<a>/ folders, results.json/.md, PNG."})
    save_models: bool = field(default=True, metadata={"help": "Write each interpolated model as a miniclip folder."})
    batch_size: int = field(default=256, metadata={"help": "Images per batch."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda or mps."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast for evaluation."})
    progress: bool = field(default=True, metadata={"help": "Progress bars (--no_progress to hide)."})

    def __post_init__(self):
        check_literal(self.templates, TemplateSet, "templates")
        check_literal(self.device, Device, "device")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not self.alphas:
            raise ValueError("--alphas needs at least one value, e.g. --alphas 0 0.5 1")
        if not self.eval_files and self.zeroshot_dir is None:
            raise ValueError("nothing to evaluate: give --eval_files (target first) and/or --zeroshot_dir")


def _eval_sets(args: WiseFtArguments) -> dict[str, list]:
    """name -> records, in the given order; names are the file stems (made unique)."""
    sets = {}
    for path in args.eval_files:
        name = Path(path).stem
        while name in sets:
            name += "_"
        records = read_caption_file(path, image_root=args.image_root)
        sets[name] = records[:args.max_eval_samples] if args.max_eval_samples else records
    return sets


def evaluate_model(model, tokenizer, args: WiseFtArguments, eval_sets: dict, folder) -> dict[str, float]:
    """Retrieval (<name>_mean_recall, ...) on each set and zero-shot accuracy (zeroshot_top1, ...) on the folder."""
    encoder = Encoder(model.to(args.device).eval(), image_transform(model.config), tokenizer, device=args.device,
                      dtype=torch.bfloat16 if args.bf16 else None, image_batch_size=args.batch_size,
                      progress=args.progress)
    metrics = {}
    for name, records in eval_sets.items():
        metrics.update({f"{name}_{k}": v for k, v in evaluate_retrieval(encoder, records).items()})
    if folder is not None:
        metrics.update(evaluate_zeroshot(encoder, folder, get_templates(args.templates, model.config)))
    return metrics


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| alpha | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['alpha']:g} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_dataclass(WiseFtArguments, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    eval_sets = _eval_sets(args)  # files first: a bad one fails before any model is loaded
    folder = None
    if args.zeroshot_dir is not None:
        folder = limit_per_class(read_image_folder(args.zeroshot_dir, args.class_map), args.zeroshot_per_class)
    zeroshot, tokenizer = load_model_and_tokenizer(args.zeroshot)
    finetuned, finetuned_tokenizer = load_model_and_tokenizer(args.finetuned)
    check_same_architecture(zeroshot, finetuned)
    if tokenizer.describe() != finetuned_tokenizer.describe():
        raise ValueError(f"the two checkpoints use different tokenizers ({tokenizer.describe()} vs "
                         f"{finetuned_tokenizer.describe()}); WiSE-FT needs one text pipeline")
    output_dir = Path(args.output_dir)
    rows = []
    for alpha in args.alphas:
        model = wise_ft(zeroshot, finetuned, alpha)
        if args.save_models:
            save_pretrained(model, output_dir / f"alpha_{alpha:g}", tokenizer=finetuned_tokenizer)
        rows.append({"alpha": alpha, **evaluate_model(model, finetuned_tokenizer, args, eval_sets, folder)})
        logger.info("alpha %g: %s", alpha, ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                                     if k.endswith(("mean_recall", "zeroshot_top1"))))
    names = list(eval_sets)
    columns = [f"{n}_{k}" for n in names for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "mean_recall")]
    columns += ["zeroshot_top1", "zeroshot_top5"] if folder is not None else []
    columns = [c for c in columns if c in rows[0]]
    table = _table(rows, columns)
    print(table)
    atomic_write_text(output_dir / "results.md", table + "\n")
    results = {"args": asdict(args), "rows": rows}
    atomic_write_json(output_dir / "results.json", results)
    knew = [f"{n}_mean_recall" for n in names[1:]] + (["zeroshot_top1"] if folder is not None else [])
    if names and knew:
        png = wise_ft_tradeoff(rows, f"{names[0]}_mean_recall", knew, output_dir / "wise_ft_tradeoff.png")
        print(f"saved {png}")
    return results


def cli() -> None:
    run_cli(main, prog="python -m miniclip.apps.wise_ft")


if __name__ == "__main__":
    cli()
