"""checkpoints/architecture.py + the vocabulary check of loading.py: inference goes by what most tensors agree on,
so one stray or damaged tensor is named as itself; a token embedding smaller than its tokenizer is refused at load."""
import pytest
import torch

from miniclip.checkpoints import CheckpointError, load_pretrained
from miniclip.config import ClipConfig
from miniclip.tokenizer import ClipBpeTokenizer


def _open_clip_state(vision_layers=2, vision_width=64) -> dict:
    import open_clip
    config = ClipConfig.from_dict({
        "embed_dim": 32, "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": vision_layers, "width": vision_width, "patch_size": 16,
                       "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}, where="test")
    torch.manual_seed(0)
    return dict(open_clip.model.CLIP(**config.open_clip_cfg()).state_dict())


def _refusal(tmp_path, state) -> str:
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path / "w.pt")
    return str(error.value)


def test_vocabulary_smaller_than_the_tokenizer_is_refused_at_load(tmp_path):
    state = _open_clip_state()
    state["token_embedding.weight"] = state["token_embedding.weight"][:49407]  # one row short of CLIP's BPE
    message = _refusal(tmp_path, state)
    assert "token_embedding.weight has 49407 rows" in message and "49408 tokens" in message
    assert "\n" not in message
    assert ClipBpeTokenizer().vocab_size == 49408  # <eot> = 49407 would index past the embedding


def test_vocabulary_larger_than_the_tokenizer_loads(tmp_path):
    state = _open_clip_state()
    state["token_embedding.weight"] = torch.cat([state["token_embedding.weight"], torch.zeros(8, 64)])
    torch.save(state, tmp_path / "w.pt")
    assert load_pretrained(tmp_path / "w.pt").config.text_cfg.vocab_size == 49416


@pytest.mark.parametrize("stray", [25, 10])
def test_a_stray_block_is_the_one_unexpected_key(tmp_path, stray):
    state = _open_clip_state(vision_layers=10)
    state[f"visual.transformer.resblocks.{stray}.ln_1.weight"] = torch.ones(64)
    message = _refusal(tmp_path, state)
    assert f"unexpected in the checkpoint (1): visual.transformer.resblocks.{stray}.ln_1.weight" in message
    assert "missing" not in message and "wrong shape" not in message


def test_a_missing_tensor_inside_a_block_is_the_one_missing_key(tmp_path):
    state = _open_clip_state(vision_layers=10)
    del state["visual.transformer.resblocks.4.ln_2.bias"]
    message = _refusal(tmp_path, state)
    assert "missing from the checkpoint (1): image_encoder.visual.transformer.resblocks.4.ln_2.bias" in message
    assert "unexpected" not in message and "wrong shape" not in message


def test_one_odd_width_is_the_one_wrong_shape(tmp_path):
    state = _open_clip_state(vision_width=256)
    state["visual.conv1.weight"] = state["visual.conv1.weight"][:255]
    message = _refusal(tmp_path, state)
    assert ("wrong shape (1): image_encoder.visual.conv1.weight: checkpoint (255, 3, 16, 16) vs model "
            "(256, 3, 16, 16)") in message
    assert "missing" not in message and "unexpected" not in message
