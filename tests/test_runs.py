"""checkpoints/runs.py: checkpoints as other trainers write them, with what their run recorded beside the weights:
a real open_clip_train run folder (made by running `open_clip_train.main`), TinyCLIP training checkpoints (key
layout and entries from TinyCLIP's CLIPBase / train.py), and the tutorial's Trainer output (the real HF Trainer)."""
import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from miniclip.checkpoints import load_pretrained, save_pretrained
from miniclip.checkpoints.io import CheckpointError
from miniclip.checkpoints.runs import named_model_config, use_model_name
from miniclip.config import ClipConfig, load_model_config
from miniclip.model import MiniClip

ATOL = 1e-5


def _inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    input_ids = torch.zeros(batch, config.text_cfg.context_length, dtype=torch.long)
    for i in range(batch):
        n = 5 + 3 * i
        input_ids[i, :n] = torch.randint(1, 49000, (n,), generator=g)
        input_ids[i, n - 1] = 49407  # EOT, the highest id
    return pixel_values, input_ids


def _assert_matches(model: MiniClip, reference, config: ClipConfig):
    pixel_values, input_ids = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), reference.encode_text(input_ids), atol=ATOL, rtol=0)


def _open_clip_reference(config: ClipConfig, quick_gelu: bool):
    import open_clip
    torch.manual_seed(0)
    return open_clip.model.CLIP(**{**config.open_clip_cfg(), "quick_gelu": quick_gelu}).eval()


# --- open_clip_train: a real run folder -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def open_clip_train_run(tmp_path_factory) -> Path:
    """logs/<run>/{params.txt, checkpoints/epoch_1.pt} from `open_clip_train.main`: tiny-vit (registered from
    miniclip's model_configs/, as a user registers a custom config) with --force-quick-gelu, 2 steps on CPU."""
    from PIL import Image
    root = tmp_path_factory.mktemp("open_clip_train")
    (root / "cfg").mkdir()
    shutil.copy(REPO / "model_configs" / "tiny-vit.json", root / "cfg" / "tiny-vit.json")
    rows = ["filepath\ttitle"]
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = torch.randint(0, 255, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(f"{root / f'{i}.png'}\ta picture number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    script = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
              "from open_clip_train.main import main; main(sys.argv[2:])")
    args = ["--model", "tiny-vit", "--force-quick-gelu", "--train-data", str(root / "train.csv"),
            "--dataset-type", "csv", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
            "--precision", "fp32", "--lr", "1e-3", "--warmup", "1", "--report-to", "none", "--logs", str(root / "logs")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, str(root / "cfg"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (root / "logs").iterdir()
    return run


def _open_clip_train_reference(run: Path):
    """open_clip's own model for the run: the same config, forced QuickGELU, the checkpoint's state_dict."""
    reference = _open_clip_reference(load_model_config("tiny-vit"), quick_gelu=True)
    reference.load_state_dict(torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"])
    return reference


def test_open_clip_train_run_folder_reads_params_txt(open_clip_train_run, caplog):
    run = open_clip_train_run
    params = (run / "params.txt").read_text()
    assert "model: tiny-vit\n" in params and "force_quick_gelu: True\n" in params  # as open_clip_train wrote it
    caplog.set_level(logging.INFO, logger="miniclip")
    for path in (run, run / "checkpoints" / "epoch_1.pt"):
        model = load_pretrained(path)
        assert model.load_info.layout == "open_clip_train"
        assert model.config.quick_gelu is True and model.config.vision_cfg.head_width == 32
        assert "params.txt" in model.load_info.config_source and "force_quick_gelu" in model.load_info.config_source
        _assert_matches(model, _open_clip_train_reference(run), model.config)
    assert "assuming GELU" not in caplog.text


def test_open_clip_train_checkpoint_alone_reads_its_run_name(open_clip_train_run, tmp_path):
    """Moved out of its run folder, the checkpoint's own `name` (<date>-model_<name>-lr_...) still names the model."""
    shutil.copy(open_clip_train_run / "checkpoints" / "epoch_1.pt", tmp_path / "epoch_1.pt")
    model = load_pretrained(tmp_path / "epoch_1.pt")
    assert model.load_info.layout == "open_clip"
    assert "the run name" in model.load_info.config_source and model.config.name == "tiny-vit"
    assert model.config.quick_gelu is False  # the run name does not carry --force-quick-gelu; tiny-vit is GELU


def test_model_names_of_open_clip_registry():
    assert named_model_config("ViT-B-32-quickgelu").quick_gelu is True
    assert named_model_config("ViT-B-32").quick_gelu is False
    assert named_model_config("no-such-model") is None


def test_unknown_model_name_keeps_the_warning(open_clip_train_run, tmp_path, caplog):
    from miniclip.checkpoints.layouts import read_file
    ckpt = read_file(open_clip_train_run / "checkpoints" / "epoch_1.pt", format="open_clip")
    ckpt.config = None
    use_model_name(ckpt, "my-custom-model", "params.txt")
    assert ckpt.config is None and "'my-custom-model'" in ckpt.note and "custom config" in ckpt.note


# --- TinyCLIP training checkpoints --------------------------------------------------------------------------------------
def _tinyclip_args(model: str) -> argparse.Namespace:
    """A TinyCLIP `args` Namespace (src/training/params.py names; values as its main.py leaves them)."""
    return argparse.Namespace(model=model, name="exp_name", lr=1e-4, batch_size=1024, epochs=6, wd=0.2,
                              precision="amp", logs="./outputs/ViT-B-32", device="cuda:0", distributed=True,
                              prune_image=False, prune_text=False, report_to="wandb", wandb=True,
                              distillation_teacher="ViT-B-32@laion2b_e16", logit_scale=50.0, seed=0)


def _tinyclip_checkpoint(reference, config: ClipConfig, ddp: bool, extra: dict | None = None) -> dict:
    """TinyCLIP train.py's checkpoint_dict: CLIPBase's `_image_encoder` / `_text_encoder` / `_logit_scale`, each
    behind its own DistributedDataParallel (`module.`) when trained on several GPUs."""
    wrap = "module." if ddp else ""
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("visual."):
            state[f"_image_encoder.{wrap}{key}"] = value
        elif key == "logit_scale":
            state[f"_logit_scale.{wrap}logit_scale"] = value
        else:
            state[f"_text_encoder.{wrap}{key}"] = value
    optimizer = torch.optim.AdamW(reference.parameters())
    return {"args": _tinyclip_args(config.name), "epoch": 2, "iter_in_epoch": 9, "num_batches": 10,
            "samples_per_epoch": 10240, "name": "exp_name", "state_dict": state,
            "optimizer": [optimizer.state_dict()], "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "model_emas": [{k: v.clone() for k, v in state.items()}], **(extra or {})}


@pytest.mark.parametrize("ddp", [True, False], ids=["ddp", "single"])
def test_tinyclip_training_checkpoint(tmp_path, ddp):
    config = load_model_config("tiny-vit")
    reference = _open_clip_reference(config, quick_gelu=False)
    torch.save(_tinyclip_checkpoint(reference, config, ddp), tmp_path / "epoch_2_iter_9.pt")
    model = load_pretrained(tmp_path / "epoch_2_iter_9.pt")  # weights_only: the Namespace is on the allow-list
    assert model.load_info.layout == "tinyclip_train"
    assert "args.model='tiny-vit'" in model.load_info.config_source and model.config.quick_gelu is False
    _assert_matches(model, reference, config)


def test_tinyclip_auto_inheritance_is_still_refused(tmp_path):
    config = load_model_config("tiny-vit")
    checkpoint = _tinyclip_checkpoint(_open_clip_reference(config, quick_gelu=False), config, ddp=True)
    checkpoint["state_dict"]["_image_encoder.module.l0_module.intermediate_loga"] = torch.zeros(2, 256)
    torch.save(checkpoint, tmp_path / "epoch_1_iter_0.pt")
    with pytest.raises(CheckpointError, match=r"auto-inheritance \(pruned\).*l0_module"):
        load_pretrained(tmp_path / "epoch_1_iter_0.pt")


class _Payload:
    """Unpickling this runs code (creates a file): what a malicious checkpoint does."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


class _EvilNamespace(argparse.Namespace):
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("where", ["entry", "inside_args", "namespace_subclass"])
def test_malicious_pickle_beside_the_namespace_does_not_run(tmp_path, where):
    config = load_model_config("tiny-vit")
    marker = tmp_path / "pwned"
    checkpoint = _tinyclip_checkpoint(_open_clip_reference(config, quick_gelu=False), config, ddp=True)
    if where == "entry":
        checkpoint["extra"] = _Payload(str(marker))
    elif where == "inside_args":
        checkpoint["args"].hook = _Payload(str(marker))
    else:
        checkpoint["args"] = _EvilNamespace(marker=str(marker))
    torch.save(checkpoint, tmp_path / "epoch_1_iter_0.pt")
    with pytest.raises(CheckpointError, match="needs arbitrary Python objects"):
        load_pretrained(tmp_path / "epoch_1_iter_0.pt")
    assert not marker.exists()


# --- the tutorial's Trainer output --------------------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)


def _tutorial_model(reference) -> nn.Module:
    """The tutorial's MiniClip: open_clip towers (built with quick_gelu=True) as image_encoder.visual,
    text_encoder.*, and logit_scale.logit_scale."""
    text = _Holder(transformer=reference.transformer, token_embedding=reference.token_embedding,
                   positional_embedding=reference.positional_embedding, ln_final=reference.ln_final,
                   text_projection=reference.text_projection)
    return _Holder(image_encoder=_Holder(visual=reference.visual), text_encoder=text,
                   logit_scale=_Holder(logit_scale=reference.logit_scale))


def test_tutorial_trainer_output_means_quick_gelu(tmp_path, caplog):
    from transformers import Trainer, TrainingArguments
    config = load_model_config("tiny-vit")
    reference = _open_clip_reference(config, quick_gelu=True)
    trainer = Trainer(model=_tutorial_model(reference), args=TrainingArguments(tmp_path / "out", report_to=[]))
    trainer.save_model(str(tmp_path / "checkpoints"))  # what the tutorial's MiniTrainer leaves: model.safetensors
    caplog.set_level(logging.INFO, logger="miniclip")
    model = load_pretrained(tmp_path / "checkpoints")
    assert model.load_info.layout == "tutorial" and model.config.quick_gelu is True
    assert "quick_gelu=True" in model.load_info.config_source and "QuickGELU" in caplog.text
    assert "assuming GELU" not in caplog.text
    _assert_matches(model, reference, config)


def test_miniclip_files_are_not_taken_for_the_tutorials(tmp_path, caplog):
    """miniclip's own folder (model_config.json), and its model.safetensors alone (tagged layout=miniclip)."""
    torch.manual_seed(0)
    saved = MiniClip("tiny-vit")
    save_pretrained(saved, tmp_path / "own")
    assert load_pretrained(tmp_path / "own" / "model.safetensors").load_info.layout == "miniclip"
    (tmp_path / "bare").mkdir()
    shutil.copy(tmp_path / "own" / "model.safetensors", tmp_path / "bare" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="miniclip"):
        model = load_pretrained(tmp_path / "bare")
    assert model.load_info.layout == "miniclip" and "assuming GELU" in caplog.text
