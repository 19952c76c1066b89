import json
from pathlib import Path

import pytest
import torch

from miniclip.config import load_model_config
from miniclip.tokenizer import (CHINESE_BERT_VOCAB, BertWordPieceTokenizer, ClipBpeTokenizer, find_bert_vocab,
                                get_tokenizer)

EDGE_CASES = [
    "", " ", "a" * 500, "x" * 150, "y" * 250, "中" * 600, "😀🐶🚀", "A dog 在草地上 running！",
    "全角，标点。：；“引号”（括号）", "tabs\tand\nnewlines\r\n here", "\u3000全角空格\u00a0nbsp",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "café ÀÉÎ naïve", "ﬁ ligature ①②③", "日本語のテキスト한국어",
    "\x00control\x1fchars", "UPPER lower MiXeD", "a photo of a dog.", "don't can't it's",
]


def _captions(path):
    return [c for entry in json.loads(path.read_text()) for c in entry["caption"]]


def test_factory_picks_by_tower():
    assert isinstance(get_tokenizer(load_model_config("tiny-vit")), ClipBpeTokenizer)
    bert = get_tokenizer(load_model_config("tiny-chinese-vit"))
    assert isinstance(bert, BertWordPieceTokenizer) and bert.context_length == 52


def test_bpe_equals_open_clip_on_edge_cases():
    import open_clip
    out = ClipBpeTokenizer()(EDGE_CASES)
    assert set(out) == {"input_ids"}
    assert torch.equal(out["input_ids"], open_clip.tokenize(EDGE_CASES))
    # over-long text keeps its start and still ends in EOT, where the tower pools
    assert out["input_ids"][5, -1] == 49407


def test_wordpiece_equals_cn_clip_on_edge_cases():
    from cn_clip.clip import tokenize
    out = BertWordPieceTokenizer(str(find_bert_vocab()))(EDGE_CASES)
    assert torch.equal(out["input_ids"], tokenize(EDGE_CASES, context_length=52))
    assert torch.equal(out["attention_mask"], out["input_ids"].ne(0).long())
    assert out["input_ids"][5, -1] == 102  # truncated Chinese text ends in [SEP]


@pytest.mark.parametrize("split", ["test", "val"])
def test_bpe_equals_open_clip_on_flickr8k(shared_data, split):
    import open_clip
    captions = _captions(shared_data / "flickr8k" / f"en_{split}.json")
    assert torch.equal(ClipBpeTokenizer()(captions)["input_ids"], open_clip.tokenize(captions))


@pytest.mark.parametrize("split", ["test", "val"])
def test_wordpiece_equals_cn_clip_on_flickr8k_cn(shared_data, split):
    from cn_clip.clip import tokenize
    captions = _captions(shared_data / "flickr8k" / f"zh_{split}.json")
    ours = BertWordPieceTokenizer(str(find_bert_vocab()))(captions)["input_ids"]
    assert torch.equal(ours, tokenize(captions, context_length=52))


def test_vocab_from_checkpoint_dir_wins(tmp_path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = get_tokenizer(load_model_config("tiny-chinese-vit"), checkpoint_dir=tmp_path)
    assert tok(["Hello world!"])["input_ids"][0, :5].tolist() == [2, 4, 5, 1, 3]


def test_shipped_chinese_vocab_is_cn_clips_and_needs_no_cn_clip(tmp_path, monkeypatch):
    """pip install miniclip is enough for Chinese: the vocab ships with the package, byte for byte Chinese-CLIP's."""
    import builtins
    cn_clip = pytest.importorskip("cn_clip.clip")
    reference = Path(cn_clip.__file__).parent / "vocab.txt"
    assert CHINESE_BERT_VOCAB.read_bytes() == reference.read_bytes()
    real_import = builtins.__import__

    def no_cn_clip(name, *args, **kwargs):
        if name.startswith("cn_clip"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cn_clip)
    assert find_bert_vocab(tmp_path) == CHINESE_BERT_VOCAB  # no vocab.txt in tmp_path: the shipped one
    tokenizer = get_tokenizer(load_model_config("tiny-chinese-vit"))
    assert tokenizer(["一只狗"])["input_ids"][0, :5].tolist() == [101, 671, 1372, 4318, 102]
    monkeypatch.setattr("miniclip.tokenizer.CHINESE_BERT_VOCAB", tmp_path / "gone.txt")
    with pytest.raises(FileNotFoundError, match="no Chinese BERT vocab.txt found.*reinstall miniclip"):
        find_bert_vocab(tmp_path)
