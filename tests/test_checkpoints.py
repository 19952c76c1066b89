"""checkpoints.py / layouts.py / infer.py / resize.py: every layout saved the way its own project saves it, loaded
with miniclip (given config and config=None), embeddings compared with the reference library's."""
import json

import pytest
import torch
from safetensors.torch import save_file

from miniclip.checkpoints import CheckpointError, load_model_and_tokenizer, load_pretrained, save_pretrained
from miniclip.config import ClipConfig, load_model_config
from miniclip.model import MiniClip
from miniclip.tokenizer import BertWordPieceTokenizer, ClipBpeTokenizer
from conftest import open_clip_reference

ATOL = 1e-5


def _inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config.vision_cfg.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    t = config.text_cfg
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    for i in range(batch):
        n = 5 + 3 * i
        input_ids[i, :n] = torch.randint(1, min(t.vocab_size, 21128) - 2, (n,), generator=g)
        if t.tower == "bert":
            input_ids[i, 0], input_ids[i, n - 1] = 101, 102  # [CLS] ... [SEP]
        else:
            input_ids[i, n - 1] = t.vocab_size - 1  # EOT, the highest id
    return pixel_values, input_ids


def _assert_same_model(a: MiniClip, b: MiniClip):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _random_model(name_or_config, seed=0) -> MiniClip:
    torch.manual_seed(seed)
    return MiniClip(name_or_config).eval()


# --- miniclip's own folder ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet", "tiny-chinese-vit", "tiny-chinese-resnet"])
def test_miniclip_folder_round_trip_is_exact(tmp_path, name):
    model = _random_model(name)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    expected = {"model.safetensors", "model_config.json", "tokenizer_config.json"}
    bert = model.config.text_cfg.tower == "bert"
    assert files == expected | ({"vocab.txt"} if bert else set())
    loaded, tokenizer = load_model_and_tokenizer(tmp_path)
    _assert_same_model(model, loaded)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not loaded.training and loaded.checkpoint_dir == tmp_path
    assert isinstance(tokenizer, BertWordPieceTokenizer if bert else ClipBpeTokenizer)
    again = MiniClip.from_pretrained(tmp_path)
    _assert_same_model(model, again)


def test_save_pretrained_function_and_tokenizer_argument(tmp_path):
    model = _random_model("tiny-vit")
    tokenizer = ClipBpeTokenizer(context_length=77)
    save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == tokenizer.describe()
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files left behind"


def test_trainer_output_without_config_is_inferred(tmp_path):
    """The tutorial's Trainer writes model.safetensors with MiniClip's names and no config: shapes decide."""
    model = _random_model("tiny-vit")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "training_args.bin").write_bytes(b"not read")
    loaded = load_pretrained(tmp_path)
    _assert_same_model(model, loaded)
    assert loaded.config.vision_cfg.head_width == 32  # taken from the shipped tiny-vit config of the same shapes
    assert loaded.load_info["layout"] == "miniclip"
