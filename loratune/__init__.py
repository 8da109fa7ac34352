"""loratune: LoRA fine-tuning of small causal language models, from one YAML config.

`import loratune` is light (no torch, transformers or peft): the public names are attributes loaded on first use,
so `loratune --help` starts at once and a program pays for the libraries only when it trains or infers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "Config": "loratune.config",
    "load_config": "loratune.config",
    "train": "loratune.training.recipe",
    "evaluate": "loratune.evaluation.compare",
    "load": "loratune.inference.load",
    "generate": "loratune.inference.batch",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'loratune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
