"""test.py (the evaluation script) end to end: its entry point on a tiny random model, real files made here,
numbers checked against the library functions and the model run by hand."""
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from miniclip import MiniClip, get_tokenizer, image_transform
from miniclip.data.captions import CaptionFileError, read_caption_file
from miniclip.evaluation.encode import Encoder, evaluate_retrieval, flatten_captions
from miniclip.evaluation.feature_cache import FeatureCacheError
from miniclip.evaluation.metrics import first_caption_indices, first_caption_retrieval

from miniclip.apps import evaluate as script  # what test.py runs


def tiny_model(seed=0):
    torch.manual_seed(seed)  # test.py seeds the same way for --model_config
    model = MiniClip("tiny-vit").eval()
    return model, get_tokenizer(model.config), image_transform(model.config)


def save_random_image(path, seed, size=(72, 56)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def caption_set(tmp_path):
    entries = []
    for i in range(7):
        save_random_image(tmp_path / "data" / "images" / f"{i}.png", i)
        entries.append({"image": f"images/{i}.png", "caption": [f"picture number {i}", f"a photo of thing {i}"][: 1 + i % 2]})
    (tmp_path / "data" / "val.json").write_text(json.dumps(entries))
    return tmp_path / "data" / "val.json"


def run(tmp_path, *args):
    return script.main(["--model_config", "tiny-vit", "--output_dir", str(tmp_path / "out"), "--no_progress",
                        *map(str, args)])


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50


def test_eval_file_prints_both_directions_and_tutorial_protocol(tmp_path, caption_set, capsys):
    results = run(tmp_path, "--eval_file", caption_set, "--grid_queries", 3, "--grid_k", 4)
    out = capsys.readouterr().out
    model, tokenizer, transform = tiny_model()
    records = read_caption_file(caption_set)
    expected = evaluate_retrieval(Encoder(model, transform, tokenizer, progress=False), records)
    assert {k: results["retrieval"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert "7 images, 10 captions" in out
    for direction, key in (("text->image", "t2i"), ("image->text", "i2t")):
        row = re.search(rf"^{direction}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M)
        assert row, out
        assert [float(x) for x in row.groups()[:3]] == pytest.approx(
            [round(expected[f"{key}_R@{k}"], 2) for k in (1, 5, 10)], abs=0.006)
        assert float(row.group(4)) == expected[f"{key}_median_rank"]
    # The tutorial's protocol: the first caption of each image as the query.
    texts, text_to_image = flatten_captions(records)
    first = first_caption_indices(text_to_image)
    encoder = Encoder(model, transform, tokenizer, progress=False)
    image_embeds = encoder.images([r.image for r in records])
    protocol = first_caption_retrieval(image_embeds, encoder.texts([texts[i] for i in first]))
    assert {k: results["retrieval"][k] for k in protocol} == pytest.approx(protocol, abs=1e-6)
    assert "Tutorial protocol (first caption per image, text->image): top-1" in out
    assert_png(tmp_path / "out" / "retrieval_grid.png")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["retrieval"]["mean_recall"] == \
        pytest.approx(expected["mean_recall"])


def test_single_image_similarities_best_first(tmp_path, capsys):
    image = save_random_image(tmp_path / "dog.png", 42)
    texts = ["a dog", "a cat", "a fish", "a pig"]
    results = run(tmp_path, "--image", image, "--texts", *texts)["single_image"]
    model, tokenizer, transform = tiny_model()
    with torch.no_grad():
        image_embeds = model.encode_image(transform(Image.open(image)).unsqueeze(0), normalize=True)
        text_embeds = model.encode_text(tokenizer(texts)["input_ids"], normalize=True)
        cosine = (image_embeds @ text_embeds.T)[0]
        probs = (model.logit_scale() * cosine).softmax(0)
    order = cosine.argsort(descending=True).tolist()
    assert results["texts"] == [texts[i] for i in order]
    assert results["cosine"] == pytest.approx(cosine[order].tolist(), abs=1e-5)
    assert results["probs"] == pytest.approx(probs[order].tolist(), abs=1e-5)
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\s+\d+\s+-?\d\.\d{4}", line)]
    assert [line.split(None, 3)[3] for line in lines] == results["texts"]
    assert_png(tmp_path / "out" / "similarity.png")


def test_zeroshot_folder_skips_unreadable(tmp_path, capsys):
    root = tmp_path / "zs"
    for c, name in enumerate(["cat", "dog", "fish"]):
        for i in range(2):
            save_random_image(root / name / f"{i}.png", 10 * c + i)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "fish" / "readme.txt").write_text("not an image")
    results = run(tmp_path, "--zeroshot_dir", root, "--templates", "simple")["zeroshot"]
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s) of 7" in out
    assert "Zero-shot on" in out and "6 images, 3 classes, 1 templates" in out
    assert results["skipped_unreadable"] == 1 and results["ignored_non_images"] == 1
    # By hand: each image's most similar "a photo of a {class}." prompt.
    model, tokenizer, transform = tiny_model()
    with torch.no_grad():
        prompts = model.encode_text(tokenizer([f"a photo of a {c}." for c in ("cat", "dog", "fish")])["input_ids"],
                                    normalize=True)
        paths = [root / c / f"{i}.png" for c in ("cat", "dog", "fish") for i in range(2)]
        images = model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]), normalize=True)
    predicted = (images @ prompts.T).argmax(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert results["zeroshot_top1"] == pytest.approx((predicted == labels).double().mean().item() * 100)
    assert "zeroshot_top5" not in results  # only 3 classes


def test_empty_class_folder_is_named(tmp_path):
    save_random_image(tmp_path / "zs" / "cat" / "0.png", 0)
    (tmp_path / "zs" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*zs/dog has no image files"):
        run(tmp_path, "--zeroshot_dir", tmp_path / "zs")


def test_caption_file_without_captions(tmp_path):
    save_random_image(tmp_path / "images" / "0.png", 0)
    (tmp_path / "val.json").write_text(json.dumps([{"image": "images/0.png", "caption": []}]))
    with pytest.raises(CaptionFileError, match=r"val.json: entry 0: captions must be a non-empty list"):
        run(tmp_path, "--eval_file", tmp_path / "val.json")


def test_feature_cache_reuse_and_other_model(tmp_path, caption_set, caplog):
    feats = tmp_path / "feats"
    first = run(tmp_path, "--eval_file", caption_set, "--save_features", feats)["retrieval"]
    assert sorted(p.name for p in feats.iterdir()) == ["val_images.json", "val_images.safetensors",
                                                       "val_texts.json", "val_texts.safetensors"]
    stamp = (feats / "val_images.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="miniclip.evaluation.feature_cache"):
        again = run(tmp_path, "--eval_file", caption_set, "--save_features", feats)["retrieval"]
    assert again == first and "reusing features" in caplog.text
    assert (feats / "val_images.safetensors").stat().st_mtime_ns == stamp
    # Another model (another seed) must not read these features ...
    with pytest.raises(FeatureCacheError, match=r"made with a different model.*--overwrite_features"):
        run(tmp_path, "--eval_file", caption_set, "--save_features", feats, "--seed", 1)
    # ... unless asked to recompute; then the cache holds the new model's features.
    other = run(tmp_path, "--eval_file", caption_set, "--save_features", feats, "--seed", 1,
                "--overwrite_features")["retrieval"]
    model, tokenizer, transform = tiny_model(seed=1)
    assert other["mean_recall"] == pytest.approx(evaluate_retrieval(Encoder(model, transform, tokenizer, progress=False),
                                                                    read_caption_file(caption_set))["mean_recall"])
    assert run(tmp_path, "--eval_file", caption_set, "--save_features", feats, "--seed", 1)["retrieval"] == other


def test_arguments_from_json_file_and_bad_arguments(tmp_path, caption_set):
    args = {"model_config": "tiny-vit", "eval_file": str(caption_set), "output_dir": str(tmp_path / "o"),
            "progress": False, "grid_k": 2}
    (tmp_path / "args.json").write_text(json.dumps(args))
    assert "mean_recall" in script.main([str(tmp_path / "args.json")])["retrieval"]
    assert_png(tmp_path / "o" / "retrieval_grid.png")
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        script.main(["--model_config", "tiny-vit", "--checkpoint", "x", "--eval_file", str(caption_set)])
    with pytest.raises(ValueError, match="nothing to do"):
        script.main(["--model_config", "tiny-vit"])
    with pytest.raises(ValueError, match="--image and --texts go together"):
        script.main(["--model_config", "tiny-vit", "--image", "dog.png"])
    with pytest.raises(ValueError, match=r"templates='fr' is not one of"):
        script.main(["--model_config", "tiny-vit", "--zeroshot_dir", ".", "--templates", "fr"])


def test_checkpoint_folder_chinese_model(tmp_path, capsys):
    """A saved Chinese-CLIP-style checkpoint: the loader's model gives what the same weights give by config, with
    the Chinese prompt templates chosen automatically and a class-name map for the folders."""
    from miniclip.checkpoints import save_pretrained
    torch.manual_seed(0)
    save_pretrained(MiniClip("tiny-chinese-vit"), tmp_path / "ckpt")
    root = tmp_path / "zs"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(2):
            save_random_image(root / name / f"{i}.png", 10 * c + i)
    (tmp_path / "names.json").write_text(json.dumps({"cat": "猫", "dog": "狗"}, ensure_ascii=False))
    task = ["--zeroshot_dir", str(root), "--class_map", str(tmp_path / "names.json"), "--no_progress"]
    loaded = script.main(["--checkpoint", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "a"), *task])
    out = capsys.readouterr().out
    assert "4 images, 2 classes, 80 templates" in out and re.search(r"^猫\s+\d", out, re.M)
    by_config = script.main(["--model_config", "tiny-chinese-vit", "--output_dir", str(tmp_path / "b"), *task])
    assert loaded["zeroshot"] == by_config["zeroshot"]


def test_onnxruntime_engine_gives_the_torch_engines_numbers(tmp_path, caption_set, caplog):
    """--engine onnxruntime: the towers exported (fp32, error checked against PyTorch) and run by onnxruntime; the
    retrieval metrics and zero-shot accuracy equal the PyTorch engine's. The export is reused for the same weights
    only."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "classes"
    for i, name in enumerate(("cat", "dog", "fish")):
        save_random_image(folder / name / "a.png", 10 + i)
    args = ["--eval_file", caption_set, "--zeroshot_dir", folder, "--templates", "simple"]
    expected = run(tmp_path / "torch", *args)
    got = run(tmp_path / "ort", *args, "--engine", "onnxruntime")
    assert got["retrieval"] == pytest.approx(expected["retrieval"], abs=1e-6)
    assert got["zeroshot"]["zeroshot_top1"] == expected["zeroshot"]["zeroshot_top1"]
    assert (tmp_path / "ort" / "out" / "onnx" / "onnx_config.json").is_file()
    with caplog.at_level(logging.INFO, logger="miniclip.evaluate"):
        assert run(tmp_path / "ort", *args, "--engine", "onnxruntime")["retrieval"] == got["retrieval"]
        assert "reusing the onnxruntime export" in caplog.text
        caplog.clear()
        other = run(tmp_path / "ort", *args, "--engine", "onnxruntime", "--seed", 1)  # other weights: a new export
        assert "reusing" not in caplog.text and "exported the towers" in caplog.text
    assert other["retrieval"] == pytest.approx(run(tmp_path / "torch", *args, "--seed", 1)["retrieval"], abs=1e-6)
    with pytest.raises(ValueError, match="--engine onnxruntime runs fp32 on the CPU"):
        run(tmp_path, *args, "--engine", "onnxruntime", "--bf16", "true")


MAPPED_SCRIPT = """
import ctypes, sys, torch
from miniclip.apps import evaluate
evaluate.main(sys.argv[1:])
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd  # bytes glibc holds in mmap()ed blocks
block = torch.ones(64 * 2**20 // 4)  # 64 MiB: glibc's default maps it afresh, above its 32 MiB mmap ceiling
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt / mallinfo2")
def test_keep_freed_memory_is_set_by_test_py_unless_turned_off(tmp_path):
    """test.py keeps freed memory in the heap, as train.py does: after its run a 64 MiB tensor comes from the heap
    (no new mmap'ed bytes), and with --keep_freed_memory false from a fresh mapping, glibc's default."""
    import subprocess
    import sys
    script = tmp_path / "mapped.py"
    script.write_text(MAPPED_SCRIPT)
    image = save_random_image(tmp_path / "x.png", 0)
    mapped = {}
    for flag in ("true", "false"):
        proc = subprocess.run([sys.executable, str(script), "--model_config", "tiny-vit", "--image", str(image),
                               "--texts", "a dog", "a cat", "--output_dir", str(tmp_path / flag),
                               "--keep_freed_memory", flag], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        mapped[flag] = int(proc.stdout.split()[-1])
    assert mapped["true"] == 0 and mapped["false"] >= 64 * 2**20, mapped
