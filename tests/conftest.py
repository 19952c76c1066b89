"""Shared fixtures: the real-data folder (skipped when absent) and reference models built by the real libraries."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data_dir() -> Path | None:
    """`$MINICLIP_DATA`, else `../shared/data` beside the repository; None when neither exists."""
    for candidate in (os.environ.get("MINICLIP_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder not found: set MINICLIP_DATA=/path/to/shared/data")
    return path


def open_clip_reference(config):
    """An `open_clip.CLIP` built from the same config, random init, eval mode."""
    import open_clip
    torch.manual_seed(0)
    return open_clip.model.CLIP(**config.open_clip_cfg()).eval()


def cn_clip_reference(config):
    """A `cn_clip` reference CLIP built from the same config, random init, eval mode."""
    from cn_clip.clip.model import CLIP
    v, t = config.vision_cfg, config.text_cfg
    torch.manual_seed(0)
    return CLIP(embed_dim=config.embed_dim, image_resolution=v.image_size, vision_layers=v.layers,
                vision_width=v.width, vision_patch_size=v.patch_size, vocab_size=t.vocab_size,
                text_attention_probs_dropout_prob=0.1, text_hidden_act=t.hidden_act, text_hidden_dropout_prob=0.1,
                text_hidden_size=t.width, text_initializer_range=0.02, text_intermediate_size=t.intermediate_size,
                text_max_position_embeddings=t.max_position_embeddings, text_num_attention_heads=t.heads,
                text_num_hidden_layers=t.layers, text_type_vocab_size=t.type_vocab_size,
                vision_head_width=v.head_width).eval()


def reference_to_miniclip(state_dict: dict) -> dict:
    """The plain prefix map from an open_clip / cn_clip CLIP state dict to MiniClip names (checkpoints.py does the
    full job with validation; the tower tests keep this independent of it)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("visual."):
            out["image_encoder." + key] = value
        elif key == "logit_scale":
            out["logit_scale.logit_scale"] = value
        else:
            out["text_encoder." + key] = value
    return out


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """`onnx_export(name) -> (model, miniclip checkpoint dir, ONNX dir)`: a seeded tiny model, saved, and its ONNX
    export (all variants) made once per test session by `python -m miniclip.apps.export` (test_onnx, test_embed)."""
    from miniclip.apps.export import main as export_main
    from miniclip.model import MiniClip
    made = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            model = MiniClip(name).eval()
            root = tmp_path_factory.mktemp(f"onnx-{name}")
            model.save_pretrained(root / "checkpoint")
            export_main(["--checkpoint", str(root / "checkpoint"), "--output_dir", str(root / "onnx")])
            made[name] = (model, root / "checkpoint", root / "onnx")
        return made[name]
    return get
