"""Loading a run for inference: its base model with the adapter (or the fully fine-tuned model) and tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..device import pick_device
from ..model.load import load_adapter, load_base_model, load_tokenizer
from ..runs import check_weights, load_run_config


def load(run_dir: str | Path, device: str = "auto", merge_adapter: bool = False,
         trust_remote_code: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of a run, in eval mode and ready to generate: the base with the run's adapter,
    or for `method: full` the fine-tuned model itself. `merge_adapter` folds the adapter into the base weights:
    generation then runs no adapter kernels (faster), at the cost of rounding the sum to the weights' dtype, so
    evaluation keeps the adapter separate, exactly as trained. Code shipped with the run or its base runs only
    with `trust_remote_code=True`, whatever the run's config says."""
    cfg = load_run_config(run_dir, trust_remote_code)
    check_weights(run_dir)
    tok = load_tokenizer(cfg.model, source=str(run_dir))
    if cfg.method == "full":
        return load_base_model(dataclasses.replace(cfg.model, name=str(run_dir)), pick_device(device)).eval(), tok
    model = load_adapter(load_base_model(cfg.model, pick_device(device)), run_dir)
    return (model.merge_and_unload() if merge_adapter else model).eval(), tok
