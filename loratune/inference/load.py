"""Loading a run for inference: its base model with the adapter (or the fully fine-tuned model) and tokenizer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..device import pick_device
from ..logs import show_logs
from ..model.load import DEFAULT_CHAT_TEMPLATE, load_adapter, load_base_model, load_tokenizer, use_chat_template
from ..runs import check_weights, is_peft_folder, load_run_config, tokenizer_source

log = logging.getLogger("loratune")


def load(run_dir: str | Path, device: str = "auto", merge_adapter: bool = False, trust_remote_code: bool = False,
         base: str | None = None, template: str | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of a run, in eval mode and ready to generate: the base with the run's adapter,
    or for `method: full` the fine-tuned model itself. `merge_adapter` folds the adapter into the base weights:
    generation then runs no adapter kernels (faster), at the cost of rounding the sum to the weights' dtype, so
    evaluation keeps the adapter separate, exactly as trained. Code shipped with the run or its base runs only
    with `trust_remote_code=True`, whatever the run's config says. `run_dir` may also be any PEFT adapter folder
    (its base from adapter_config.json, or `base`)."""
    show_logs()
    cfg = load_run_config(run_dir, trust_remote_code, base)
    check_weights(run_dir)
    tok = load_tokenizer(cfg.model, source=tokenizer_source(run_dir))
    if template:  # the prompt format asked for in this command (a run keeps the one it trained with otherwise)
        use_chat_template(tok, template)
    elif is_peft_folder(run_dir) and tok.chat_template == DEFAULT_CHAT_TEMPLATE:
        log.warning("%s: neither the adapter nor its base has a chat template; prompts use loratune's plain "
                    "'User:' / 'Assistant:' format", run_dir)
    if cfg.method == "full":
        return load_base_model(dataclasses.replace(cfg.model, name=str(run_dir)), pick_device(device)).eval(), tok
    model = load_adapter(load_base_model(cfg.model, pick_device(device)), run_dir)
    return (model.merge_and_unload() if merge_adapter else model).eval(), tok
