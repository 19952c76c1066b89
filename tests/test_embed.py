"""`python -m miniclip.apps.embed` against the model's own encode_image / encode_text: made image folders and caption
files, both output formats, both runtimes (PyTorch and the exported ONNX graphs), bf16, resuming after an
interruption, Flickr8k images and captions (skipped without the shared data), and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from miniclip.apps import embed
from miniclip.apps.cli import run_cli
from miniclip.evaluation.encode import Encoder
from miniclip.tokenizer import get_tokenizer
from miniclip.transforms import image_transform

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install -e '.[serve]'")

CAPTIONS = ["a red square", "", "two dogs play in the snow", "a " * 90, "一只猫"]


def make_folder(root, n=5):
    """n coloured PNGs (one in a sub-folder), a broken .jpg and a notes file; -> (folder, readable paths sorted)."""
    (root / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / ("sub" if i == 0 else ".") / f"{i}.png"
        image = Image.new("RGB", (70 + 7 * i, 60), (50 * i, 120, 220 - 40 * i))
        image.paste((255 - 50 * i, 10, 10), (0, 0, 20, 20))
        image.save(path)
        paths.append(path.resolve())
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root, sorted(paths)


def expected_images(model, paths):
    transform = image_transform(model.config)
    with torch.inference_mode():
        return model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]), normalize=True)


def expected_texts(model, texts):
    tokenizer = get_tokenizer(model.config)
    with torch.inference_mode():
        return torch.cat([model.encode_text(**tokenizer([t]), normalize=True) for t in texts])  # one at a time, 77


def read_output(path, kind):
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            return f.get_tensor(f"{kind}_embeds"), json.loads(meta["paths" if kind == "image" else "captions"]), meta
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    embeds = torch.from_numpy(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    return embeds, table.column("path" if kind == "image" else "caption").to_pylist(), table.schema.metadata


def checkpoint_args(onnx_export, runtime):
    model, checkpoint, onnx_dir = onnx_export("tiny-vit")
    return model, ["--checkpoint", str(onnx_dir if runtime == "onnx" else checkpoint), "--runtime", runtime]


@pytest.mark.parametrize("runtime, suffix", [("torch", ".safetensors"), ("onnx", ".parquet")])
def test_images_equal_encode_image(onnx_export, tmp_path, runtime, suffix):
    model, args = checkpoint_args(onnx_export, runtime)
    folder, paths = make_folder(tmp_path / "photos")
    out = tmp_path / f"embeds{suffix}"
    embed.main([*args, "--images", str(folder), "--out", str(out), "--batch_size", "2", "--chunk_size", "3"])
    embeds, names, _ = read_output(out, "image")
    assert names == [str(p) for p in paths]  # broken.jpg and notes.txt left out
    torch.testing.assert_close(embeds, expected_images(model, paths), atol=1e-4 if runtime == "onnx" else 1e-5, rtol=0)
    assert not (tmp_path / f"embeds{suffix}.parts").exists()


@pytest.mark.parametrize("runtime, suffix", [("torch", ".parquet"), ("onnx", ".safetensors")])
def test_captions_equal_encode_text(onnx_export, tmp_path, runtime, suffix):
    model, args = checkpoint_args(onnx_export, runtime)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n\n")
    out = tmp_path / f"captions{suffix}"
    embed.main([*args, "--captions", str(tmp_path / "captions.txt"), "--out", str(out), "--batch_size", "1"])
    embeds, names, _ = read_output(out, "text")
    kept = [c.strip() for c in CAPTIONS if c.strip()]  # one caption a line, blank lines skipped
    assert names == kept
    torch.testing.assert_close(embeds, expected_texts(model, kept), atol=1e-4 if runtime == "onnx" else 1e-5, rtol=0)


def test_bf16_is_close_to_fp32(onnx_export, tmp_path):
    model, args = checkpoint_args(onnx_export, "torch")
    folder, paths = make_folder(tmp_path / "photos")
    embed.main([*args, "--images", str(folder), "--out", str(tmp_path / "b.safetensors"), "--precision", "bf16"])
    embeds, _, meta = read_output(tmp_path / "b.safetensors", "image")
    cosine = torch.cosine_similarity(embeds, expected_images(model, paths), dim=-1)
    assert meta["precision"] == "bf16" and float(cosine.min()) > 0.99 and float(cosine.min()) < 1 - 1e-7


def test_an_interrupted_run_resumes_where_it_stopped(onnx_export, tmp_path, monkeypatch):
    model, args = checkpoint_args(onnx_export, "torch")
    folder, paths = make_folder(tmp_path / "photos", n=6)  # 7 image files (one broken): chunks of 2 -> 4 chunks
    argv = [*args, "--images", str(folder), "--out", str(tmp_path / "e.safetensors"), "--chunk_size", "2"]
    calls, real = [], Encoder.image_files

    def interrupted_at_third_chunk(self, images, skip_unreadable=True):
        calls.append(list(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C (or a killed job) mid-run
        return real(self, images, skip_unreadable)

    monkeypatch.setattr(Encoder, "image_files", interrupted_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed.main(argv)
    assert len(list((tmp_path / "e.safetensors.parts").glob("chunk-*.safetensors"))) == 2
    calls.clear()
    monkeypatch.setattr(Encoder, "image_files", lambda self, images, skip_unreadable=True:
                        calls.append(list(images)) or real(self, images, skip_unreadable))
    embed.main(argv)
    assert len(calls) == 2  # chunks 3 and 4 only
    embeds, names, _ = read_output(tmp_path / "e.safetensors", "image")
    assert names == [str(p) for p in paths]
    torch.testing.assert_close(embeds, expected_images(model, paths), atol=1e-5, rtol=0)


def test_flickr8k_images_and_captions(onnx_export, shared_data, tmp_path):
    model, args = checkpoint_args(onnx_export, "torch")
    records = json.loads((shared_data / "flickr8k" / "en_test.json").read_text())[:12]
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(records))
    root = shared_data / "flickr8k"
    embed.main([*args, "--images", str(subset), "--image_root", str(root), "--out", str(tmp_path / "i.safetensors")])
    embeds, names, _ = read_output(tmp_path / "i.safetensors", "image")
    paths = [(root / r["image"]).resolve() for r in records]
    assert names == [str(p) for p in paths]
    torch.testing.assert_close(embeds, expected_images(model, paths), atol=1e-5, rtol=0)
    _, args = checkpoint_args(onnx_export, "onnx")
    embed.main([*args, "--captions", str(subset), "--image_root", str(root), "--out", str(tmp_path / "c.parquet")])
    embeds, captions, _ = read_output(tmp_path / "c.parquet", "text")
    expected = [c for r in records for c in r["caption"]]
    assert captions == expected
    torch.testing.assert_close(embeds, expected_texts(model, expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra, message", [
    ([], "give exactly one of --images"),
    (["--images", "x", "--captions", "y"], "give exactly one of --images"),
    (["--captions", "c.txt", "--runtime", "onnx", "--precision", "bf16"], "--precision bf16 is for --runtime torch"),
    (["--captions", "c.txt", "--out", "e.npy"], r"must end in one of \['.safetensors', '.parquet'\]"),
    (["--captions", "c.txt", "--runtime", "tensorrt"], r"runtime='tensorrt' is not one of \['torch', 'onnx'\]"),
])
def test_bad_arguments_are_one_line_errors(capsys, extra, message):
    argv = ["--checkpoint", "never-loaded", "--out", "e.safetensors", *extra]
    with pytest.raises(SystemExit) as raised:
        run_cli(embed.main, argv, prog="miniclip-embed")
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.startswith("miniclip-embed: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err)


def test_a_corrupt_onnx_graph_is_a_one_line_error(onnx_export, tmp_path, capsys):
    import shutil
    _, _, onnx_dir = onnx_export("tiny-vit")
    broken = shutil.copytree(onnx_dir, tmp_path / "broken")
    (broken / "image_encoder.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "c.txt").write_text("a dog\n")
    with pytest.raises(SystemExit):
        run_cli(embed.main, ["--checkpoint", str(broken), "--runtime", "onnx", "--captions", str(tmp_path / "c.txt"),
                             "--out", str(tmp_path / "e.safetensors")], prog="miniclip-embed")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"miniclip-embed: error: {broken / 'image_encoder.onnx'} is not a readable ONNX graph")
