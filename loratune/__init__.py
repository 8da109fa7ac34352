"""loratune: LoRA fine-tuning of small causal language models, from one YAML config."""

from .config import Config, load_config
from .evaluate import evaluate
from .infer import load
from .train import train

__all__ = ["Config", "load_config", "train", "evaluate", "load"]
__version__ = "0.1.0"
