"""Tokenizers: one entry point, `get_tokenizer(config)`, returning CLIP's BPE (open_clip's bundled vocabulary,
EOT-terminated, context 77) or Chinese-CLIP's BERT WordPiece ([CLS] ... [SEP], lower-cased, context 52).

Leaves out on purpose: HF-hub tokenizers of other open_clip families (SigLIP, MobileCLIP...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from miniclip.config import ClipConfig, TextConfig

VOCAB_FILENAME = "vocab.txt"


@dataclass
class ClipBpeTokenizer:
    """open_clip's SimpleTokenizer: `<sot> bpe... <eot>`, zero-padded; over-long text keeps its first
    context_length - 1 tokens and ends in `<eot>` (the tower pools at the EOT, the highest token id)."""
    context_length: int = 77
    kind: str = "clip_bpe"

    def __post_init__(self):
        from open_clip.tokenizer import SimpleTokenizer
        self._tokenizer = SimpleTokenizer(context_length=self.context_length)

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return {"input_ids": self._tokenizer(texts, context_length=self.context_length)}  # (N, L) int64

    def describe(self) -> dict:
        return {"kind": self.kind, "context_length": self.context_length}

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (49408 for CLIP's BPE; <eot> is the last)."""
        return self._tokenizer.vocab_size


@dataclass
class BertWordPieceTokenizer:
    """Chinese-CLIP's tokenizer: BERT basic tokenization (lower case, accents stripped, CJK characters split,
    punctuation split) then WordPiece over `vocab.txt`; `[CLS] tokens[:L-2] [SEP]`, padded with `[PAD]`=0."""
    vocab_file: str
    context_length: int = 52
    kind: str = "bert_wordpiece"

    def __post_init__(self):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        self.vocab = _read_vocab(Path(self.vocab_file))
        for token in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
            if token not in self.vocab:
                raise ValueError(f"vocabulary {self.vocab_file} has no {token} token: is it a BERT vocab.txt?")
        # Chinese-CLIP's WordPiece gives up on words longer than 200 characters (HF's default is 100).
        tok = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=200))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer = tok
        self.cls_id, self.sep_id, self.pad_id = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]"))

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)  # (N, L)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids = [self.cls_id, *encoding.ids[: self.context_length - 2], self.sep_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return {"input_ids": input_ids, "attention_mask": input_ids.ne(self.pad_id).long()}

    def describe(self) -> dict:
        return {"kind": self.kind, "context_length": self.context_length, "vocab_file": VOCAB_FILENAME}

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"BERT vocabulary not found: {path}")
    # One token a line, split on "\n" only: str.splitlines() would also split on the rare separator characters
    # (U+2028, U+0085...) that are themselves tokens in the vocab, shifting every id after them.
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {line.strip(): i for i, line in enumerate(lines)}


def find_bert_vocab(checkpoint_dir: str | Path | None = None) -> Path:
    """vocab.txt from the checkpoint directory if it has one, else the copy inside the installed `cn_clip` wheel."""
    looked = []
    if checkpoint_dir is not None:
        candidate = Path(checkpoint_dir) / VOCAB_FILENAME
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    try:
        import cn_clip.clip
        candidate = Path(cn_clip.clip.__file__).parent / VOCAB_FILENAME
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    except ImportError:
        looked.append("the cn_clip package (not installed)")
    raise FileNotFoundError(
        "no Chinese BERT vocab.txt found; looked in: " + "; ".join(looked) +
        ". Fix: put the model's vocab.txt next to the checkpoint, or `pip install cn_clip` (its wheel ships it).")


def get_tokenizer(config: ClipConfig | TextConfig, checkpoint_dir: str | Path | None = None):
    """The tokenizer a config's text tower was trained with."""
    text_cfg = config.text_cfg if isinstance(config, ClipConfig) else config
    if text_cfg.tower == "bert":
        return BertWordPieceTokenizer(str(find_bert_vocab(checkpoint_dir)), context_length=text_cfg.context_length)
    return ClipBpeTokenizer(context_length=text_cfg.context_length)


def save_tokenizer(tokenizer, output_dir: str | Path) -> None:
    """Write `tokenizer.json` (what the tokenizer is) and, for BERT, the vocab itself, so output_dir is self-contained."""
    output_dir = Path(output_dir)
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer.describe(), indent=2) + "\n")
    if isinstance(tokenizer, BertWordPieceTokenizer):
        target = output_dir / VOCAB_FILENAME
        if Path(tokenizer.vocab_file).resolve() != target.resolve():
            target.write_text(Path(tokenizer.vocab_file).read_text(encoding="utf-8"), encoding="utf-8")


def trim_tokens(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns after the batch's longest sequence. BERT (with an attention_mask): the mask says
    where each row ends. CLIP BPE: each row ends at its EOT, the highest token id (argmax), where the causal tower
    pools, so the columns after the last EOT change nothing; attention_mask marks positions up to the EOT (not
    `input_ids != 0`: id 0 is the byte token "!", which can occur inside a caption)."""
    input_ids = tokens["input_ids"]  # (B, L)
    if "attention_mask" in tokens:
        attention_mask = tokens["attention_mask"]
    else:
        eot = input_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
        attention_mask = (torch.arange(input_ids.shape[1]).unsqueeze(0) <= eot).long()  # (B, L)
    length = int(attention_mask.sum(dim=1).max())
    return {"input_ids": input_ids[:, :length].contiguous(), "attention_mask": attention_mask[:, :length].contiguous()}
