"""ONNX towers: `export_onnx` writes a MiniClip's image and text towers as two onnxruntime graphs (torch.onnx's dynamo
exporter; dynamic batch and text length), with fp16 and int8 (dynamic quantization) variants whose error against
PyTorch is measured at export and stored in `onnx_config.json`. `OnnxClip` runs the graphs behind MiniClip's
`encode_image` / `encode_text`, so `evaluation.encode.Encoder` batches, trims and normalises them unchanged.

Leaves out on purpose: GPU / TensorRT execution-provider tuning, static (calibrated) int8, and one joint graph (a
search service runs the towers apart: the images once offline, one text per query).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from miniclip.config import ClipConfig, check_literal
from miniclip.evaluation.encode import Encoder
from miniclip.files import atomic_write, atomic_write_json
from miniclip.model import MiniClip
from miniclip.tokenizer import ClipBpeTokenizer, get_tokenizer, trim_tokens
from miniclip.transforms import image_transform

logger = logging.getLogger(__name__)

Variant = Literal["fp32", "fp16", "int8"]
VARIANTS: tuple[str, ...] = ("fp32", "fp16", "int8")
ONNX_CONFIG = "onnx_config.json"
BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's CLIP BPE merges, copied so the folder is self-contained
FORMAT_VERSION = 1
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GiB: bigger towers keep weights in a .data file
FP32_MIN_COSINE = 1 - 1e-5  # an fp32 graph further from PyTorch than this is an exporter bug, not rounding
INSTALL_HINT = ("ONNX export / runtime needs the optional `serve` extra: pip install -e '.[serve]' "
                "(onnx, onnxruntime, onnxscript)")
PROBE_CAPTIONS = ("", "a photo of a dog", " ".join(["a small red bird sits on a branch"] * 20))  # empty .. > context


class OnnxExportError(ValueError):
    """A model that cannot be exported, or whose graph does not reproduce PyTorch; the message says why."""


class OnnxGraphError(ValueError):
    """An exported folder or .onnx file that cannot be used (missing, corrupt, foreign); the message names it."""


def graph_file(tower: str, variant: str) -> str:
    """`image_encoder.onnx`, `text_encoder.fp16.onnx`, ..."""
    return f"{tower}_encoder.onnx" if variant == "fp32" else f"{tower}_encoder.{variant}.onnx"


def require_onnx():
    """(onnx, onnxruntime), or ImportError saying how to install them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter builds graphs with it)
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return onnx, onnxruntime


# --- export -----------------------------------------------------------------------------------------------------------
class _ImageGraph(nn.Module):
    def __init__(self, model: MiniClip):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        return self.model.encode_image(pixel_values)


class _TextGraph(nn.Module):
    def __init__(self, model: MiniClip):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)  # (B, L) -> (B, D)


def _exportable(model) -> MiniClip:
    """An fp32 CPU eval-mode MiniClip (a copy when the model lives elsewhere), or OnnxExportError saying why not."""
    if not isinstance(model, MiniClip):
        raise OnnxExportError(
            f"export_onnx exports a miniclip.MiniClip, got {type(model).__module__}.{type(model).__name__}. Load the "
            "checkpoint with miniclip.MiniClip.from_pretrained (open_clip, OpenAI, HF and Chinese-CLIP files all load).")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise OnnxExportError("the model has no weights (meta device): load a checkpoint before exporting")
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # the graphs are fp32; fp16 / int8 are derived from them
    return model.eval()


def _export(module: nn.Module, args: tuple, input_names: list[str], output: str, dynamic: dict, path: Path,
            external: bool) -> int:
    """torch.onnx.export with the dynamo exporter -> the opset used. Its progress prints go to the debug log."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            # input_ids and attention_mask share their batch / length dims on purpose; torch says so each time
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            program = torch.onnx.export(module.eval(), args, None, input_names=input_names, output_names=[output],
                                        dynamic_shapes=dynamic, dynamo=True)
        _write(path, lambda file: program.save(str(file), external_data=external), external)
    except Exception as e:  # torch.export / onnxscript raise many types; the first line says which op or guard
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise OnnxExportError(f"torch.onnx (dynamo) could not export {path.name}: {type(e).__name__}: {first}. "
                              "miniclip exports its own towers (ViT, ModifiedResNet, causal and BERT text); a "
                              "modified tower must be traceable by torch.export.") from None
    logger.debug("%s", printed.getvalue())
    return max(program.model.opset_imports.values())


def _write(path: Path, write, external: bool) -> None:
    """Atomically, except for graphs with external weights: those name their `<file>.data` after the file they are
    written to, so they are written under the final name (onnx_config.json, written last, marks them complete)."""
    if external:
        write(path)
    else:
        atomic_write(path, write)


def _probe_inputs(model: MiniClip, tokenizer) -> tuple[torch.Tensor, list[dict]]:
    """Fixed inputs the variants' error is measured on: 4 random images and two caption batches (the empty caption
    at the shortest length; one over the context, cut to the full length)."""
    size = model.config.vision_cfg.image_size
    pixel_values = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))  # (4, 3, S, S)
    texts = [trim_tokens(tokenizer(list(PROBE_CAPTIONS[:1]))), trim_tokens(tokenizer(list(PROBE_CAPTIONS)))]
    return pixel_values, texts


def _text_feeds(tokens: dict, input_names: list[str]) -> dict:
    return {name: tokens[name].numpy() for name in input_names}


def _errors(out, ref: torch.Tensor) -> dict:
    out = torch.from_numpy(out)
    cosine = F.cosine_similarity(out, ref, dim=-1).min()
    return {"max_abs": float((out - ref).abs().max()), "min_cosine": float(cosine)}


def _measure(directory: Path, variant: str, model: MiniClip, probe, text_inputs: list[str]) -> dict:
    """Error of one variant's graphs against PyTorch fp32 on the probe inputs."""
    _, ort = require_onnx()
    pixel_values, texts = probe
    image = _session(directory / graph_file("image", variant), ort)
    text = _session(directory / graph_file("text", variant), ort)
    with torch.inference_mode():
        image_err = _errors(image.run(None, {"pixel_values": pixel_values.numpy()})[0], model.encode_image(pixel_values))
        text_errs = [_errors(text.run(None, _text_feeds(t, text_inputs))[0],
                             model.encode_text(t["input_ids"], t["attention_mask"])) for t in texts]
    return {"image_max_abs_error": image_err["max_abs"], "image_min_cosine": image_err["min_cosine"],
            "text_max_abs_error": max(e["max_abs"] for e in text_errs),
            "text_min_cosine": min(e["min_cosine"] for e in text_errs)}


def _derive(directory: Path, variant: str, tower: str, external: bool) -> None:
    """fp16 (weights and compute, fp32 inputs / outputs kept) or int8 (dynamic quantization: int8 weights,
    activations quantized per batch at run time) from the fp32 graph; onnxruntime's own converters."""
    onnx, _ = require_onnx()
    source, target = directory / graph_file(tower, "fp32"), directory / graph_file(tower, variant)
    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        graph = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        external_args = {"save_as_external_data": True, "location": target.name + ".data"} if external else {}
        _write(target, lambda file: onnx.save(graph, str(file), **external_args), external)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # quantize_dynamic logs (root logger) a hint to run its pre-processing; that pass targets static,
        # calibrated quantization, and the error measured below is what counts here.
        hint = _DropMessage("pre-processing before quantization")
        logging.getLogger().addFilter(hint)
        try:
            _write(target, lambda file: quantize_dynamic(source, file, weight_type=QuantType.QInt8,
                                                         use_external_data_format=external), external)
        finally:
            logging.getLogger().removeFilter(hint)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def export_onnx(model: MiniClip, output_dir: str | Path, variants: Sequence[str] = VARIANTS, tokenizer=None) -> dict:
    """Write `image_encoder[.variant].onnx` (pixel_values (B, 3, S, S) -> image_embeds (B, D)) and
    `text_encoder[.variant].onnx` (input_ids (B, L) [+ attention_mask (B, L) for BERT] -> text_embeds (B, D)),
    embeddings as `encode_image` / `encode_text` give them (not normalised), and `onnx_config.json` (preprocessing,
    tokenizer, logit_scale, each variant's measured error). Returns that config. `save_pretrained(format="onnx")`
    calls this and adds the tokenizer files."""
    require_onnx()
    for variant in variants:
        check_literal(variant, Variant, "variant")
    if "fp32" not in variants:
        raise ValueError(f"variants={list(variants)} must include 'fp32': fp16 and int8 are derived from it")
    model, output_dir = _exportable(model), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ONNX_CONFIG).unlink(missing_ok=True)  # written last: a folder with it holds one complete export
    config, bert = model.config, model.config.text_cfg.tower == "bert"
    tokenizer = tokenizer or get_tokenizer(config, checkpoint_dir=model.checkpoint_dir)
    external = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=config.text_cfg.context_length)
    size = config.vision_cfg.image_size
    opset = _export(_ImageGraph(model), (torch.randn(2, 3, size, size),), ["pixel_values"], "image_embeds",
                    {"pixel_values": {0: batch}}, output_dir / graph_file("image", "fp32"), external)
    # Example captions of 7 tokens, none at the edges (0, 1, context), so that no size is specialised.
    input_ids = torch.randint(1, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    input_ids[:, -1] = config.text_cfg.vocab_size - 1  # the causal tower pools at the highest id (EOT)
    text_inputs = ["input_ids", "attention_mask"] if bert else ["input_ids"]
    args = (input_ids, torch.ones_like(input_ids)) if bert else (input_ids,)
    _export(_TextGraph(model), args, text_inputs, "text_embeds", {name: {0: batch, 1: length} for name in text_inputs},
            output_dir / graph_file("text", "fp32"), external)
    for variant in variants:
        if variant != "fp32":
            for tower in ("image", "text"):
                _derive(output_dir, variant, tower, external)
    probe = _probe_inputs(model, tokenizer)
    measured = {v: {"image_encoder": graph_file("image", v), "text_encoder": graph_file("text", v),
                    **_measure(output_dir, v, model, probe, text_inputs)} for v in variants}
    _check_fp32(measured["fp32"])
    onnx_config = _describe(model, tokenizer, text_inputs, opset, measured)
    if isinstance(tokenizer, ClipBpeTokenizer):
        from open_clip.tokenizer import default_bpe
        atomic_write(output_dir / BPE_VOCAB, lambda tmp: shutil.copyfile(default_bpe(), tmp))
    atomic_write_json(output_dir / ONNX_CONFIG, onnx_config)
    for v, m in measured.items():
        logger.info("onnx %s: image max |err| %.2e (min cos %.6f), text max |err| %.2e (min cos %.6f)", v,
                    m["image_max_abs_error"], m["image_min_cosine"], m["text_max_abs_error"], m["text_min_cosine"])
    return onnx_config


def _check_fp32(measured: dict) -> None:
    worst = min(measured["image_min_cosine"], measured["text_min_cosine"])
    if worst < FP32_MIN_COSINE:
        raise OnnxExportError(f"the exported fp32 graphs disagree with PyTorch (min cosine {worst:.6f}, max |err| "
                              f"{max(measured['image_max_abs_error'], measured['text_max_abs_error']):.3g}): "
                              f"{ONNX_CONFIG} not written. Please report it with the model config.")


def _describe(model: MiniClip, tokenizer, text_inputs: list[str], opset: int, measured: dict) -> dict:
    config, pre = model.config, model.config.preprocess_cfg
    tokenizer_info = dict(tokenizer.describe())
    if isinstance(tokenizer, ClipBpeTokenizer):
        tokenizer_info["bpe_file"] = BPE_VOCAB
    return {
        "format_version": FORMAT_VERSION,
        "exporter": {"tool": "torch.onnx.export(dynamo=True)", "torch": torch.__version__, "opset": opset},
        "embed_dim": config.embed_dim,
        "embeds_normalized": False,  # as encode_image / encode_text: L2-normalise before cosine similarity
        "logit_scale": float(model.logit_scale.logit_scale.detach().exp()),  # the multiplier exp(t): scale * cos
        "logit_bias": float(model.logit_bias.logit_bias.detach()) if model.logit_bias is not None else None,
        "image": {"input": "pixel_values", "output": "image_embeds", "image_size": config.vision_cfg.image_size,
                  "resize_mode": pre.resize_mode, "interpolation": "bicubic", "mean": list(pre.mean),
                  "std": list(pre.std)},
        "text": {"inputs": text_inputs, "output": "text_embeds", "context_length": config.text_cfg.context_length,
                 "pad_id": 0, "pooling": "cls" if text_inputs[-1] == "attention_mask" else "eot (argmax of input_ids)",
                 "tokenizer": tokenizer_info},
        "variants": measured,
        "model_config": config.to_dict(),
    }


# --- runtime ----------------------------------------------------------------------------------------------------------
def _session(path: Path, ort, threads: int | None = None):
    if not path.is_file():
        raise OnnxGraphError(f"ONNX graph not found: {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no public base class
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OnnxGraphError(f"{path} is not a readable ONNX graph ({type(e).__name__}: {first}). Export it again: "
                             "python -m miniclip.apps.export --checkpoint CKPT --format onnx --output_dir DIR") from None


def read_onnx_config(directory: str | Path) -> dict:
    path = Path(directory) / ONNX_CONFIG
    if not path.is_file():
        raise OnnxGraphError(f"{directory} is not an exported ONNX folder: no {ONNX_CONFIG}. Make one with "
                             "python -m miniclip.apps.export --checkpoint CKPT --format onnx --output_dir DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OnnxGraphError(f"{path} is not valid JSON: {e}") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise OnnxGraphError(f"{path}: format_version {data.get('format_version')!r}, this miniclip reads "
                             f"{FORMAT_VERSION}: export the model again with this version")
    return data


class OnnxClip:
    """An exported folder run by onnxruntime (CPU) behind MiniClip's encoding methods: `encode_image(pixel_values)`
    and `encode_text(input_ids, attention_mask)` take and return torch tensors, so `Encoder(OnnxClip(dir), ...)`
    (see `onnx_encoder`) works as with the PyTorch model. `config` is the model's ClipConfig."""
    training = False  # Encoder switches models to eval mode and back; graphs have one mode

    def __init__(self, directory: str | Path, variant: str = "fp32", threads: int | None = None):
        check_literal(variant, Variant, "variant")
        _, ort = require_onnx()
        self.directory, self.variant = Path(directory), variant
        self.onnx_config = read_onnx_config(self.directory)
        if variant not in self.onnx_config["variants"]:
            raise OnnxGraphError(f"{self.directory} has no {variant} graphs (exported: "
                                 f"{', '.join(self.onnx_config['variants'])}); export with --variants {variant}")
        self.config = ClipConfig.from_dict(self.onnx_config["model_config"], where=str(self.directory / ONNX_CONFIG))
        self.image_session = _session(self.directory / graph_file("image", variant), ort, threads)
        self.text_session = _session(self.directory / graph_file("text", variant), ort, threads)
        self.text_inputs = [i.name for i in self.text_session.get_inputs()]
        expected_inputs = [(self.image_session, ["pixel_values"]),
                           (self.text_session, self.onnx_config["text"]["inputs"])]
        for session, expected in expected_inputs:
            names = [i.name for i in session.get_inputs()]
            if names != expected:
                raise OnnxGraphError(f"{self.directory}: a graph takes inputs {names}, {ONNX_CONFIG} says {expected}: "
                                     "the folder mixes files of different exports; export it again")
        self.logit_scale = self.onnx_config["logit_scale"]

    def eval(self) -> "OnnxClip":
        return self

    def train(self, mode: bool = True) -> "OnnxClip":
        return self

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        pixel_values = pixel_values.detach().float().cpu().contiguous().numpy()  # (B, 3, S, S)
        embeds = torch.from_numpy(self.image_session.run(None, {"pixel_values": pixel_values})[0])  # (B, D)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = input_ids.ne(0).long()  # (B, L); only the BERT graph reads it
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        feeds = {name: tokens[name].detach().long().cpu().contiguous().numpy() for name in self.text_inputs}
        embeds = torch.from_numpy(self.text_session.run(None, feeds)[0])  # (B, D)
        return F.normalize(embeds, dim=-1) if normalize else embeds


def onnx_encoder(directory: str | Path, variant: str = "fp32", threads: int | None = None, **encoder_args) -> Encoder:
    """An `Encoder` over the exported graphs, with the image transform and tokenizer the folder describes."""
    if encoder_args.get("dtype") not in (None, torch.float32):
        raise ValueError(f"dtype={encoder_args['dtype']} does not apply to ONNX graphs: pick variant='fp16' or 'int8'")
    model = OnnxClip(directory, variant, threads)
    return Encoder(model, image_transform(model.config), get_tokenizer(model.config, checkpoint_dir=directory),
                   device="cpu", **encoder_args)
