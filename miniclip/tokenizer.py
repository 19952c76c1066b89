"""Tokenizers: one entry point, `get_tokenizer(config)`, returning CLIP's BPE (open_clip's bundled vocabulary,
EOT-terminated, context 77), Chinese-CLIP's BERT WordPiece ([CLS] ... [SEP], lower-cased, context 52), or a
transformers text tower's own tokenizer (`AutoTokenizer`, saved into each checkpoint's text_tower/ folder).

Leaves out on purpose: HF-hub tokenizers of other open_clip families (SigLIP, MobileCLIP...).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from miniclip.config import CHINESE_CLIP_CONTEXT_LENGTH, CLIP_CONTEXT_LENGTH, ClipConfig, TextConfig

VOCAB_FILENAME = "vocab.txt"
HF_TOKENIZER_DIR = "text_tower"  # a miniclip checkpoint's copy of a transformers tokenizer
# Files of which one marks a folder holding a transformers tokenizer (a VisionTextDualEncoder folder has them on top).
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
CHINESE_BERT_VOCAB = Path(__file__).resolve().parent / "vocab" / "bert-base-chinese-vocab.txt"


@dataclass
class ClipBpeTokenizer:
    """open_clip's SimpleTokenizer: `<sot> bpe... <eot>`, zero-padded; over-long text keeps its first
    context_length - 1 tokens and ends in `<eot>` (the tower pools at the EOT, the highest token id)."""
    context_length: int = CLIP_CONTEXT_LENGTH
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
    context_length: int = CHINESE_CLIP_CONTEXT_LENGTH
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


@dataclass
class HFTokenizer:
    """A transformers text tower's own tokenizer (`AutoTokenizer`): its special tokens, padded with its pad token
    to context_length and truncated there, with the attention mask the tower pools with."""
    path: str
    context_length: int = 512
    kind: str = "hf"

    def __post_init__(self):
        from transformers import AutoTokenizer
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        except OSError as e:
            from miniclip.config import HF_FIX
            raise FileNotFoundError(f"no tokenizer for text tower {self.path!r}: {str(e).splitlines()[0]}. "
                                    + HF_FIX) from None

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self._tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}  # (N, L) int64 each

    def describe(self) -> dict:
        return {"kind": self.kind, "context_length": self.context_length, "path": HF_TOKENIZER_DIR}

    def save(self, directory: str | Path) -> None:
        """save_pretrained into `directory`, each file moved into place whole (os.replace)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as tmp:
            for path in self._tokenizer.save_pretrained(tmp):
                if Path(path).is_file():
                    os.replace(path, directory / Path(path).name)


def find_hf_tokenizer(text_cfg: TextConfig, checkpoint_dir: str | Path | None = None) -> str:
    """A checkpoint's own tokenizer copy (text_tower/, or the folder itself for transformers' folders), else the
    tokenizer of hf_model_name."""
    if checkpoint_dir is not None:
        for folder in (Path(checkpoint_dir) / HF_TOKENIZER_DIR, Path(checkpoint_dir)):
            if any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
                return str(folder)
    return text_cfg.hf_model_name


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
    """vocab.txt from the checkpoint directory if it has one, else the Chinese BERT vocabulary shipped with miniclip
    (the one Chinese-CLIP's models use; miniclip/vocab/NOTICE says where it comes from)."""
    if checkpoint_dir is not None:
        candidate = Path(checkpoint_dir) / VOCAB_FILENAME
        if candidate.is_file():
            return candidate
    if not CHINESE_BERT_VOCAB.is_file():
        raise FileNotFoundError(f"no Chinese BERT vocab.txt found: neither in {checkpoint_dir} nor the shipped "
                                f"{CHINESE_BERT_VOCAB} (a broken install: reinstall miniclip, or put the model's "
                                "vocab.txt next to the checkpoint)")
    return CHINESE_BERT_VOCAB


def get_tokenizer(config: ClipConfig | TextConfig, checkpoint_dir: str | Path | None = None):
    """The tokenizer a config's text tower was trained with."""
    text_cfg = config.text_cfg if isinstance(config, ClipConfig) else config
    if text_cfg.tower == "bert":
        return BertWordPieceTokenizer(str(find_bert_vocab(checkpoint_dir)), context_length=text_cfg.context_length)
    if text_cfg.tower == "hf":
        return HFTokenizer(find_hf_tokenizer(text_cfg, checkpoint_dir), context_length=text_cfg.context_length)
    return ClipBpeTokenizer(context_length=text_cfg.context_length)


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
