"""Search demo: a Gradio page over a caption file or an image folder. Type a description (English or Chinese, with
the model's own tokenizer) or upload an image, and see the top-k most similar images with scores and captions.

    python -m miniclip.apps.demo --checkpoint TinyCLIP-ViT-40M-32-Text-19M-LAION400M --data en_val.json --port 7860

The page serves only what it indexed: a result image is copied into a private folder the first time it is shown, and
Gradio (uploads and cache in that folder, no `allowed_paths`) serves nothing else; tests/test_demo_http.py checks it
over HTTP. Leaves out on purpose: share links, login, and more than one model per process (one model, one index).
"""
from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miniclip.checkpoints.loading import load_model_and_tokenizer
from miniclip.evaluation.encode import Encoder
from miniclip.apps.cli import parse_dataclass, run_cli
from miniclip.files import atomic_write, cache_dir as cache_dir_for
from miniclip.apps.search_index import SearchIndex, build_index, read_image_set
from miniclip.transforms import ImageDecodeError, image_transform, load_image

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # longer text is cut before tokenizing (the tokenizer keeps far fewer tokens anyway)
INSTALL_HINT = ("miniclip.apps.demo needs Gradio, an optional extra. Install it with:\n"
                "    pip install -e '.[demo]'      (from the miniclip repository; or: pip install 'gradio>=4')")


@dataclass
class DemoArguments:
    checkpoint: str = field(metadata={"help": "Checkpoint directory or file, or a model name the loader knows"})
    data: str = field(metadata={"help": "Caption file (the tutorial's JSON list, JSONL or CSV) or a folder of images"})
    image_root: str | None = field(default=None, metadata={
        "help": "Folder the caption file's image paths are relative to (default: the caption file's folder)"})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (loopback by default)"})
    port: int = field(default=7860, metadata={"help": "Port to serve on"})
    top_k: int = field(default=8, metadata={"help": "Number of results shown at start (the page has a slider)"})
    max_k: int = field(default=48, metadata={"help": "Largest k the slider allows"})
    batch_size: int = field(default=64, metadata={"help": "Images per batch while building the index"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1... (default: cuda if available)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": f"Where built indexes are cached (default: {cache_dir_for('search_index')})"})
    no_cache: bool = field(default=False, metadata={"help": "Build the index in memory only; read and write no cache"})
    rebuild_index: bool = field(default=False, metadata={"help": "Ignore a cached index and build it again"})

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be in 1..65535")
        if not 1 <= self.top_k <= self.max_k:
            raise ValueError(f"top_k={self.top_k} must be between 1 and max_k={self.max_k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")


def _long_twin(tokenizer):
    """The same tokenizer with a much longer context, to tell whether a query was truncated; None if not a
    dataclass with a context_length (then truncation is not reported)."""
    if not (dataclasses.is_dataclass(tokenizer) and hasattr(tokenizer, "context_length")):
        return None
    # A character is at most 4 UTF-8 bytes, hence at most 4 byte-level BPE tokens; +2 for the start/end tokens.
    return dataclasses.replace(tokenizer, context_length=4 * MAX_QUERY_CHARS + 2)


class ServedImages:
    """What the page hands to Gradio for result `row`: a copy of that indexed image in `folder` (made when first
    shown), so the image folders themselves are never exposed; a notes file or a key next to the photos stays put."""

    def __init__(self, images: list[Path], folder: Path):
        self.images, self.folder = images, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, row: int) -> str:
        source = self.images[row]
        target = self.folder / f"{row:07d}-{source.name}"
        if not target.is_file():
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        return str(target)


def private_gradio_folder() -> Path:
    """A fresh folder for Gradio's uploads and cache (GRADIO_TEMP_DIR, shared by every Gradio app on the machine by
    default, and served by each of them), removed at exit. Must be set before the app is built."""
    folder = Path(tempfile.mkdtemp(prefix="miniclip-demo-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder / "examples")  # default: ./.gradio/cached_examples, also served
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Searcher:
    """The loaded model, tokenizer and index, and the two searches the page calls: the app's only state.
    `served` maps a result row to the file the page shows (default: the indexed path itself)."""

    def __init__(self, encoder: Encoder, index: SearchIndex, served: ServedImages | None = None):
        self.encoder, self.index = encoder, index
        self.served = served or (lambda row: str(index.images[row]))
        self.model, self.tokenizer = encoder.model.eval(), encoder.tokenizer
        self.long_tokenizer = _long_twin(self.tokenizer)

    def is_truncated(self, query: str) -> bool:
        """Did the tokenizer cut the query? Its pad id is 0 in both families, and a truncated query's end token
        ([SEP] / EOT, never 0) lies beyond the model's context in the long twin's output."""
        if self.long_tokenizer is None:
            return False
        input_ids = self.long_tokenizer([query])["input_ids"]  # (1, L_long)
        return bool(input_ids[0, self.tokenizer.context_length:].any())

    def text_search(self, query: str | None, k: int) -> tuple[list[tuple[str, str]], str]:
        """-> (gallery items [(image path, caption)], Markdown status line)."""
        query, notes = (query or "").strip(), []
        if not query:
            return [], "Type a description to search for, e.g. *a dog running on the grass*."
        if len(query) > MAX_QUERY_CHARS:
            query = query[:MAX_QUERY_CHARS]
            notes.append(f"Only the first {MAX_QUERY_CHARS} characters of the query were read.")
        if self.is_truncated(query):
            notes.append(f"The query is longer than the model's {self.tokenizer.context_length}-token context: "
                         "it was truncated and the rest was ignored.")
        start = time.perf_counter()
        text_embeds = self.encoder.texts([query])  # (1, D)
        return self._results(text_embeds[0], k, start, notes)

    def image_search(self, upload: str | None, k: int) -> tuple[list[tuple[str, str]], str]:
        if not upload:
            return [], "Upload an image to find the most similar ones."
        start = time.perf_counter()
        try:
            image = load_image(upload)
        except ImageDecodeError:
            return [], (f"Could not read **{Path(upload).name}** as an image. "
                        "Upload a JPEG, PNG, WebP, BMP or GIF file.")
        image_embeds = self.encoder.images([image])  # (1, D)
        return self._results(image_embeds[0], k, start, [])

    def _results(self, query_embeds: torch.Tensor, k: int, start: float, notes: list[str]):
        hits = self.index.search(query_embeds, int(k))
        captions = self.index.captions
        gallery = [(self.served(row), f"{score:.3f} · {captions[row][0]}") for row, score in hits]
        status = f"Top {len(hits)} of {len(self.index)} images ({time.perf_counter() - start:.2f} s)."
        return gallery, " ".join([status, *notes])


def index_summary(index: SearchIndex) -> str:
    """One line for the page header: size, skipped files, and whether the index came from the cache."""
    parts = [f"{len(index)} images indexed"]
    if index.missing:
        parts.append(f"{len(index.missing)} listed images missing on disk were skipped")
    if index.unreadable:
        parts.append(f"{len(index.unreadable)} unreadable images were skipped")
    how = "loaded from cache" if index.from_cache else "built"
    return "; ".join(parts) + f" ({how} in {index.seconds:.1f} s)."


def build_app(searcher: Searcher, top_k: int = 8, max_k: int = 48):
    """The page: text box + button, image upload, k slider, status line, result gallery."""
    import gradio as gr
    with gr.Blocks(title="miniclip search") as app:
        gr.Markdown(f"# miniclip image search\n{index_summary(searcher.index)}")
        with gr.Row():
            query = gr.Textbox(label="Search by text", placeholder="a dog running on the grass / 草地上奔跑的狗",
                               max_lines=3, scale=5, elem_id="query")
            button = gr.Button("Search", variant="primary", scale=1, elem_id="search")
        with gr.Row():
            upload = gr.File(label="Search by image", file_types=["image"], type="filepath", height=150,
                             elem_id="upload")
            k = gr.Slider(1, max(max_k, top_k), value=top_k, step=1, label="Number of results (k)", elem_id="k")
        status = gr.Markdown("", elem_id="status")
        gallery = gr.Gallery(label="Results", columns=4, object_fit="contain", elem_id="results")
        for event in (query.submit, button.click):
            event(searcher.text_search, inputs=[query, k], outputs=[gallery, status])
        upload.upload(searcher.image_search, inputs=[upload, k], outputs=[gallery, status])
    return app


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local demo
    try:
        import gradio
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    return gradio


def parse_args(argv: list[str] | None = None) -> DemoArguments:
    return parse_dataclass(DemoArguments, argv, description=__doc__.split("\n\n")[0])


def load_searcher(args: DemoArguments) -> Searcher:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    model = model.to(device).eval()
    image_set = read_image_set(args.data, args.image_root)
    if image_set.missing:
        logger.warning("%d of %d images listed in %s are missing on disk and were skipped (first: %s)",
                       len(image_set.missing), len(image_set.missing) + len(image_set.images), args.data,
                       image_set.missing[0])
    cache_dir = None if args.no_cache else (args.cache_dir or cache_dir_for("search_index"))
    encoder = Encoder(model, image_transform(model.config), tokenizer, device=device,
                      image_batch_size=args.batch_size)
    index = build_index(encoder, image_set, cache_dir, rebuild=args.rebuild_index)
    logger.info(index_summary(index))
    encoder.progress = False  # single queries from the page
    return Searcher(encoder, index)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    _import_gradio()  # fail before the slow model load and index build
    if not is_loopback(args.host):
        logger.warning("serving on %s: anyone who can reach this machine on port %d can use the page and see the "
                       "indexed images; the default --host 127.0.0.1 keeps it on this machine", args.host, args.port)
    searcher = load_searcher(args)
    folder = private_gradio_folder()
    searcher.served = ServedImages(searcher.index.images, folder / "indexed")
    app = build_app(searcher, args.top_k, args.max_k)
    # No allowed_paths: Gradio then serves only its own folder (uploads, cache, the copies ServedImages made).
    app.launch(server_name=args.host, server_port=args.port, allowed_paths=[], show_error=False)


def cli(argv: list[str] | None = None) -> None:
    """The `miniclip-demo` console script (and `python -m miniclip.apps.demo`)."""
    run_cli(main, argv, prog="miniclip-demo")


if __name__ == "__main__":
    cli()
