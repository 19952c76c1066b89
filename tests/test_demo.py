"""The search demo without a browser: image set reading, index build / cache / invalidation, exact top-k against a
hand-computed ranking, the text and image searches against the model's own embeddings, and bad input."""
import json
import re
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from miniclip.checkpoints import save_pretrained
from miniclip.apps.demo import MAX_QUERY_CHARS, DemoArguments, Searcher, index_summary
from miniclip.model import MiniClip
from miniclip.evaluation.encode import Encoder
from miniclip.apps.search_index import SearchIndex, build_index, read_image_set
from miniclip.tokenizer import get_tokenizer
from miniclip.transforms import image_transform

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (250, 250, 250)}


def make_image_set(root: Path, names=tuple(COLOURS)) -> Path:
    """Solid-colour PNGs under root/images and root/captions.json in the tutorial's format."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, name in enumerate(names):
        # A stripe of another colour so no two images are identical after the transform.
        image = Image.new("RGB", (80, 60), COLOURS[name])
        image.paste((i * 40 % 256, 128, 255 - i * 40 % 256), (0, 0, 80, 8))
        image.save(root / "images" / f"{name}.png")
        entries.append({"image": f"images/{name}.png", "caption": [f"a {name} square", f"something {name}"]})
    (root / "captions.json").write_text(json.dumps(entries))
    return root / "captions.json"


def tiny_model(name="tiny-vit", seed=0) -> MiniClip:
    torch.manual_seed(seed)
    return MiniClip(name).eval()


@pytest.fixture
def caption_file(tmp_path) -> Path:
    return make_image_set(tmp_path / "data")


def reference_image_embeds(model, paths) -> torch.Tensor:
    """Straight through the model, no index code: PIL -> transform -> encode_image -> L2 normalise."""
    transform = image_transform(model.config)
    pixel_values = torch.stack([transform(Image.open(p)) for p in paths])  # (N, 3, S, S)
    with torch.no_grad():
        return model.encode_image(pixel_values, normalize=True)  # (N, D)


# --- image sets -----------------------------------------------------------------------------------------------------
def test_caption_file_with_missing_and_duplicate_images(tmp_path, caption_file):
    entries = json.loads(caption_file.read_text())
    entries += [{"image": "images/gone.png", "caption": ["not here"]},
                {"image": "images/red.png", "caption": ["again"]}]
    caption_file.write_text(json.dumps(entries))
    image_set = read_image_set(caption_file)
    assert [p.name for p in image_set.images] == [f"{c}.png" for c in COLOURS]
    assert [p.name for p in image_set.missing] == ["gone.png"]
    assert image_set.captions[0] == ("a red square", "something red", "again")


def test_caption_file_with_no_image_on_disk_is_a_clear_error(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"image": "nope/a.jpg", "caption": ["x"]}]))
    with pytest.raises(FileNotFoundError, match=r"none of its 1 images exist .*nope/a.jpg.*--image_root"):
        read_image_set(tmp_path / "c.json")


def test_image_folder(tmp_path, caption_file):
    folder = caption_file.parent / "images"
    (folder / "notes.txt").write_text("not an image")
    image_set = read_image_set(folder)
    assert [p.name for p in image_set.images] == sorted(f"{c}.png" for c in COLOURS)
    assert image_set.captions[0] == ("black",)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        read_image_set(tmp_path / "empty")


def encoder_for(model):
    return Encoder(model, image_transform(model.config), get_tokenizer(model.config), progress=False)


# --- index ----------------------------------------------------------------------------------------------------------
def test_index_equals_direct_model_embeddings(caption_file):
    model = tiny_model()
    image_set = read_image_set(caption_file)
    index = build_index(encoder_for(model), image_set, None)
    assert index.images == image_set.images and not index.from_cache
    torch.testing.assert_close(index.image_embeds, reference_image_embeds(model, image_set.images), atol=1e-5, rtol=0)
    torch.testing.assert_close(index.image_embeds.norm(dim=-1), torch.ones(len(COLOURS)))


def test_index_cache_reused_and_invalidated(tmp_path, caption_file):
    model, cache = tiny_model(), tmp_path / "cache"
    image_set = read_image_set(caption_file)
    first = build_index(encoder_for(model), image_set, cache)
    second = build_index(encoder_for(model), image_set, cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert torch.equal(first.image_embeds, second.image_embeds) and second.images == first.images
    # A touched image file (new mtime) and a different model each get a fresh build.
    stat = image_set.images[2].stat()
    os.utime(image_set.images[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not build_index(encoder_for(model), image_set, cache).from_cache
    assert not build_index(encoder_for(tiny_model(seed=1)), image_set, cache).from_cache
    assert build_index(encoder_for(model), image_set, cache).from_cache
    assert not build_index(encoder_for(model), image_set, cache, rebuild=True).from_cache


def test_corrupt_cache_file_is_rebuilt(tmp_path, caption_file):
    model, cache = tiny_model(), tmp_path / "cache"
    image_set = read_image_set(caption_file)
    first = build_index(encoder_for(model), image_set, cache)
    for tensors_file in cache.glob("*.safetensors"):
        tensors_file.write_bytes(b"garbage")
    again = build_index(encoder_for(model), image_set, cache)
    assert not again.from_cache and torch.equal(again.image_embeds, first.image_embeds)


def test_unreadable_and_missing_images_are_skipped_and_counted(tmp_path, caption_file):
    (caption_file.parent / "images" / "green.png").write_bytes(b"not a png at all")
    caption_file.write_text(json.dumps(json.loads(caption_file.read_text()) + [{"image": "x.png", "caption": "gone"}]))
    model = tiny_model()
    image_set = read_image_set(caption_file)
    for from_cache in (False, True):
        index = build_index(encoder_for(model), image_set, tmp_path / "cache")
        assert index.from_cache == from_cache
        assert [p.name for p in index.unreadable] == ["green.png"]
        assert "green.png" not in [p.name for p in index.images] and len(index) == len(COLOURS) - 1
        assert index.captions[1] == ("a blue square", "something blue")  # captions stay with their images
    summary = index_summary(index)
    assert summary.startswith(f"{len(COLOURS) - 1} images indexed; 1 listed images missing on disk were skipped; "
                              "1 unreadable images were skipped (loaded from cache in ")


# --- top-k ----------------------------------------------------------------------------------------------------------
def random_index(n=50, d=16) -> SearchIndex:
    g = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return SearchIndex([Path(f"{i}.jpg") for i in range(n)], [(f"c{i}",) for i in range(n)], embeds)


def test_top_k_is_the_exact_ranking():
    index = random_index()
    query = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 3  # not unit length: search normalises
    unit = query / query.norm()
    scores = [float(sum(a * b for a, b in zip(row.tolist(), unit.tolist()))) for row in index.image_embeds]
    expected = sorted(range(50), key=lambda i: -scores[i])[:7]  # hand ranking, plain Python
    hits = index.search(query, 7)
    assert [row for row, _ in hits] == expected
    assert [s for _, s in hits] == pytest.approx([scores[i] for i in expected], abs=1e-5)
    assert len(index.search(query, 500)) == 50 and len(index.search(query, 0)) == 1  # k clamped to 1..N


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss", reason="faiss not installed (optional: pip install faiss-cpu)")
    index = random_index()
    query = index.image_embeds[3] + 0.1
    torch_hits, faiss_hits = index.search(query, 10, backend="torch"), index.search(query, 10, backend="faiss")
    assert [r for r, _ in faiss_hits] == [r for r, _ in torch_hits]
    assert [s for _, s in faiss_hits] == pytest.approx([s for _, s in torch_hits], abs=1e-5)


def test_search_rejects_wrong_dim_and_backend():
    index = random_index()
    with pytest.raises(ValueError, match="query has 8 dims, the index 16"):
        index.search(torch.ones(8), 3)
    with pytest.raises(ValueError, match=r"backend='annoy' is not one of \['auto', 'torch', 'faiss'\]"):
        index.search(torch.ones(16), 3, backend="annoy")


# --- the page's two searches ----------------------------------------------------------------------------------------
def make_searcher(caption_file, name="tiny-vit") -> Searcher:
    model = tiny_model(name)
    index = build_index(encoder_for(model), read_image_set(caption_file), None)
    return Searcher(encoder_for(model), index)


@pytest.mark.parametrize("name, query", [("tiny-vit", "a red square"),
                                         ("tiny-chinese-vit", "一个红色的正方形")])
def test_text_search_ranks_by_the_models_text_embedding(caption_file, name, query):
    searcher = make_searcher(caption_file, name)
    model, paths = searcher.model, searcher.index.images
    with torch.no_grad():
        text_embeds = model.encode_text(**get_tokenizer(model.config)([query]), normalize=True)[0]  # (D,)
    scores = reference_image_embeds(model, paths) @ text_embeds  # (N,)
    order = scores.argsort(descending=True)[:4].tolist()
    gallery, status = searcher.text_search(f"  {query}  ", 4)
    assert [item[0] for item in gallery] == [str(paths[i]) for i in order]
    first = searcher.index.captions[order[0]][0]
    assert gallery[0][1] == f"{scores[order[0]]:.3f} · {first}"
    assert status.startswith(f"Top 4 of {len(COLOURS)} images") and "truncated" not in status


@pytest.mark.parametrize("name, unit, fits", [("tiny-vit", "a ", 75), ("tiny-chinese-vit", "狗", 50)])
def test_over_long_query_is_truncated_and_said_so(caption_file, name, unit, fits):
    """CLIP BPE: <sot> + 75 tokens + <eot> fill the 77-token context; BERT: [CLS] + 50 + [SEP] fill 52."""
    searcher = make_searcher(caption_file, name)
    assert not searcher.is_truncated((unit * fits).strip()) and searcher.is_truncated((unit * (fits + 1)).strip())
    gallery, status = searcher.text_search(unit * 300, 3)
    assert len(gallery) == 3 and "truncated" in status and f"{searcher.tokenizer.context_length}-token" in status
    _, status = searcher.text_search("x" * (MAX_QUERY_CHARS + 5), 3)
    assert f"Only the first {MAX_QUERY_CHARS} characters" in status


@pytest.mark.parametrize("query", ["", "   \n ", None])
def test_empty_query_gives_a_message_not_results(caption_file, query):
    gallery, status = make_searcher(caption_file).text_search(query, 5)
    assert gallery == [] and status.startswith("Type a description")


def test_image_search_finds_the_image_itself_first(caption_file):
    searcher = make_searcher(caption_file)
    query_path = searcher.index.images[3]
    gallery, status = searcher.image_search(str(query_path), 2)
    assert gallery[0][0] == str(query_path) and gallery[0][1].startswith("1.000 · ")
    assert len(gallery) == 2 and status.startswith("Top 2 of")


def test_unreadable_or_missing_upload_gives_a_message(tmp_path, caption_file):
    searcher = make_searcher(caption_file)
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    gallery, status = searcher.image_search(str(bad), 3)
    assert gallery == [] and "Could not read **photo.jpg** as an image" in status
    assert searcher.image_search(None, 3) == ([], "Upload an image to find the most similar ones.")


# --- command line ---------------------------------------------------------------------------------------------------
def test_arguments_are_checked():
    with pytest.raises(ValueError, match="top_k=60 must be between 1 and max_k=48"):
        DemoArguments(checkpoint="tiny-vit", data="x.json", top_k=60)
    with pytest.raises(ValueError, match="port=70000"):
        DemoArguments(checkpoint="tiny-vit", data="x.json", port=70000)


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, caption_file):
    from miniclip.apps.demo import main
    # Python's own import machinery refuses `gradio` (a None entry in sys.modules raises ImportError), whether or
    # not it is installed here; main() must stop before loading anything.
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(SystemExit, match=r"needs Gradio, an optional extra(.|\n)*pip install -e '\.\[demo\]'"):
        main(["--checkpoint", "never-loaded", "--data", str(caption_file)])


@pytest.mark.parametrize("problem", ["no images", "no checkpoint"])
def test_bad_data_or_checkpoint_is_a_clear_startup_error(tmp_path, problem, capsys):
    pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[demo]')")
    from miniclip.apps.demo import cli
    checkpoint = save_pretrained(tiny_model(), tmp_path / "ckpt") if problem == "no images" else tmp_path / "nope"
    (tmp_path / "c.json").write_text(json.dumps([{"image": "images/a.jpg", "caption": ["x"]}]))
    expected = r"none of its 1 images exist" if problem == "no images" else r"nope"
    with pytest.raises(SystemExit) as exit_info:
        cli(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "c.json"), "--no_cache"])
    assert exit_info.value.code == 2  # a user error: one line, no traceback
    assert re.match(rf"^miniclip-demo: error: .*{expected}", capsys.readouterr().err)
