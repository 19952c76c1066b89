"""miniclip: a small, readable CLIP trainer on the Hugging Face Trainer. The CLIP itself lives at this level
(config, model, attention, tokenizer, transforms, loss, distributed); checkpoints/, data/, training/, evaluation/
and apps/ each hold one concern.
"""
from miniclip.config import ClipConfig, TextConfig, VisionConfig, list_model_configs, load_model_config
from miniclip.model import ClipOutput, MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.transforms import image_transform
from miniclip.checkpoints.inherit import inherit  # after model: checkpoints/ builds MiniClip

__all__ = ["ClipConfig", "ClipOutput", "MiniClip", "TextConfig", "VisionConfig", "get_tokenizer", "image_transform",
           "inherit", "list_model_configs", "load_model_config"]
__version__ = "0.1.0"
