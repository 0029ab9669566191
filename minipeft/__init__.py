"""minipeft: parameter-efficient fine-tuning from scratch in pure PyTorch."""

from .adapter import AdapterConfig
from .checkpoint import load_pretrained, save_pretrained
from .ia3 import IA3Config
from .loftq import LoftQConfig
from .lora import LoraConfig
from .model import ModelConfig, Transformer
from .nf4 import NF4Linear, dequantize_nf4, quantize_model, quantize_nf4
from .peft import PeftModel, get_peft_model
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .tokenizer import Tokenizer
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig",
    "IA3Config",
    "LoftQConfig",
    "LoraConfig",
    "ModelConfig",
    "NF4Linear",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "dequantize_nf4",
    "get_peft_model",
    "load_pretrained",
    "quantize_model",
    "quantize_nf4",
    "save_pretrained",
]
