"""miniclip: a small, readable CLIP trainer on the Hugging Face Trainer."""
from .config import ClipConfig, TextConfig, VisionConfig, list_model_configs, load_model_config
from .model import ClipOutput, MiniClip
from .tokenizer import get_tokenizer
from .transforms import image_transform

__all__ = ["ClipConfig", "ClipOutput", "MiniClip", "TextConfig", "VisionConfig", "get_tokenizer", "image_transform",
           "list_model_configs", "load_model_config"]
__version__ = "0.1.0"
