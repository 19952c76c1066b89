"""Checkpoints: reading every published CLIP layout into `MiniClip` strictly, and writing models back out.

One file per step of the loading pipeline, in order: hub.py (name -> path), io.py (safe reads), layouts.py (the
table of layouts: detection and key maps, with the converters hf_clip.py and chinese_clip.py), architecture.py
(config from shapes), resize.py (position embeddings), loading.py (check against a meta skeleton, then copy);
saving.py writes the export formats.
"""
from miniclip.checkpoints.io import CheckpointError
from miniclip.checkpoints.layouts import IGNORABLE, LAYOUTS
from miniclip.checkpoints.loading import LoadResult, load_model_and_tokenizer, load_pretrained
from miniclip.checkpoints.saving import save_pretrained

__all__ = ["CheckpointError", "IGNORABLE", "LAYOUTS", "LoadResult", "load_model_and_tokenizer", "load_pretrained",
           "save_pretrained"]
