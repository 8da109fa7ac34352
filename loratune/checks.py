"""What a valid config is, beyond its types: the allowed choices and ranges of each key, and the names other tools
use for loratune's keys. config.py reports every problem of a file at once, before anything slow happens."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Iterator

# Keys users bring from HF TrainingArguments, TRL, Axolotl and peft -> loratune's key (a note where it differs).
FOREIGN_KEYS = {
    "learning_rate": "train.lr",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "num_train_epochs": "train.num_epochs",
    "num_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "save_strategy": "train.save_every (steps) or train.save_every_minutes",
    "eval_steps": "train.eval_every",
    "eval_strategy": "train.eval_every (steps)",
    "evaluation_strategy": "train.eval_every (steps)",
    "save_total_limit": "train.keep_checkpoints",
    "max_grad_norm": "train.grad_clip",
    "lr_scheduler_type": "train.schedule",
    "lr_scheduler": "train.schedule",
    "bf16": "train.precision (bf16)",
    "fp16": "train.precision (fp16)",
    "load_best_model_at_end": "train.best_metric (the best checkpoint is always kept)",
    "metric_for_best_model": "train.best_metric",
    "optim": "nothing: loratune always uses AdamW",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length",
    "cutoff_len": "data.max_length",
    "model_max_length": "data.max_length",
    "sample_packing": "data.packing",
    "dataset_text_field": "data.datasets[].fields (e.g. {text: your_column})",
    "dataset": "data.datasets",
    "val_set_size": "data.datasets[].eval_fraction",
    "base_model": "model.name",
    "model_name_or_path": "model.name",
    "model_name": "model.name",
    "torch_dtype": "model.dtype",
}

# key -> allowed values (keys inside data.datasets are written data.datasets[].key)
CHOICES = {
    "method": ("lora", "full"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "lora.bias": ("none", "all", "lora_only"),
    "lora.init": ("default", "gaussian", "pissa", "olora"),
    "data.truncation": ("truncate", "drop"),
    "data.on_bad_record": ("error", "skip"),
    "data.datasets[].format": ("chat", "completion", "text"),
    "data.datasets[].text_mode": ("lines", "document"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.resume": ("never", "auto"),
    "train.parallel": ("ddp", "fsdp"),
    "train.fast": ("auto", "on", "off"),
    "train.compile": ("auto", "on", "off"),
    "train.cuda_graphs": ("auto", "on", "off"),
}
CHOICE_HINTS = {("train.device", "gpu"): "for a GPU write cuda", ("train.precision", "fp16-mixed"): "write fp16",
                ("train.precision", "bfloat16"): "write bf16", ("train.precision", "float32"): "write fp32"}


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"at least {low:g}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"above {low:g}"


def _between(low: float, high: float, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    return ((lambda v: low <= v < high) if high_open else (lambda v: low <= v <= high),
            f"from {low:g} to {high:g}{' (not included)' if high_open else ''}")


# key -> (check, what it must be); None values (where a key allows null) are not checked
RANGES = {
    "lora.r": _at_least(1), "lora.alpha": _above(0), "lora.dropout": _between(0, 1, high_open=True),
    "data.max_length": _at_least(2), "data.max_samples_per_dataset": _at_least(1),
    "data.datasets[].weight": _at_least(0), "data.datasets[].eval_fraction": _between(0, 1),
    "data.datasets[].max_samples": _at_least(1),
    "train.batch_size": _at_least(1), "train.grad_accum": _at_least(1), "train.lr": _above(0),
    "train.weight_decay": _at_least(0), "train.warmup_steps": _at_least(0),
    "train.warmup_ratio": _between(0, 1, high_open=True), "train.min_lr_ratio": _between(0, 1),
    "train.num_epochs": _above(0), "train.max_steps": _at_least(1), "train.grad_clip": _at_least(0),
    "train.log_every": _at_least(1), "train.save_every": _at_least(0), "train.save_every_minutes": _at_least(0),
    "train.keep_checkpoints": _at_least(0), "train.eval_every": _at_least(0), "train.generate_every_evals": _at_least(0),
    "train.generate_samples": _at_least(1), "train.early_stopping_patience": _at_least(0),
    "train.early_stopping_min_delta": _at_least(0), "eval.max_new_tokens": _at_least(1), "eval.batch_size": _at_least(1),
}
TRACKERS = ("tensorboard", "wandb", "mlflow")


def values(cfg: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(concrete key, value) for a key of the tables; `data.datasets[].x` yields one per dataset."""
    if "[]." in key:
        head, tail = key.split("[].")
        for i, item in enumerate(_get(cfg, head)):
            yield f"{head}[{i}].{tail}", getattr(item, tail)
    else:
        yield key, _get(cfg, key)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def problems(cfg: Any) -> list[tuple[str, str]]:
    """(key, what is wrong and how to fix it) for every problem of a built config."""
    found = []
    for key, allowed in CHOICES.items():
        for concrete, value in values(cfg, key):
            if value not in allowed:
                hint = CHOICE_HINTS.get((key, value))
                found.append((concrete, f"'{value}' should be one of {', '.join(allowed)}" + (f" ({hint})" if hint else "")))
    for key, (ok, must) in RANGES.items():
        for concrete, value in values(cfg, key):
            if value is not None and not ok(value):
                found.append((concrete, f"{value!r} should be {must}"))
    tc = cfg.train
    for name in tc.report_to:
        if name not in TRACKERS:
            found.append(("train.report_to", f"unknown tracker '{name}'; use {', '.join(TRACKERS)}"))
        elif name != "tensorboard" and not _installed(name):  # tensorboard is skipped when absent
            found.append(("train.report_to", f"{name} is not installed: pip install {name}, or remove it from the list"))
    if not tc.best_metric.startswith("eval_loss"):
        found.append(("train.best_metric", f"'{tc.best_metric}' should be eval_loss or eval_loss/DATASET"))
    if tc.precision == "fp16" and tc.device == "cpu":
        found.append(("train.precision", "fp16 needs a GPU; use bf16 or fp32 on the CPU"))
    adapter = cfg.model.adapter
    if adapter and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        found.append(("model.adapter", f"{adapter} holds no adapter_config.json; give a loratune run or a PEFT LoRA "
                      "folder"))
    elif adapter and not (Path(adapter).expanduser() / "adapter_model.safetensors").is_file():
        found.append(("model.adapter", f"{adapter} has no adapter_model.safetensors (loratune loads safetensors only)"))
    if adapter and cfg.method != "lora":
        found.append(("model.adapter", "continuing an adapter needs method: lora"))
    template = cfg.data.chat_template
    if template not in ("auto", "chatml", "plain") and not Path(template).expanduser().is_file():
        found.append(("data.chat_template", f"'{template}' is not auto, chatml, plain or a Jinja file that exists"))
    for i, ds in enumerate(cfg.data.datasets):
        if ds.data_files and not ds.hub:  # else `path` (the demo set by default) would be read instead, silently
            found.append((f"data.datasets[{i}].data_files", "data_files are read through a `datasets` builder: set "
                          "hub to json, csv, parquet or text (with a preset too), or give one file as path instead"))
    return found


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module already imported without a spec (a stand-in, say) is there
        return True


def suggestion(key: str, prefix: str, names: list[str], sections: dict[str, list[str]]) -> str:
    """The hint for an unknown key: the ecosystem name it comes from, the section it belongs to, or a close name."""
    if key in FOREIGN_KEYS:
        return f"loratune calls it '{FOREIGN_KEYS[key]}'"
    here = prefix.split(".")[0].split("[")[0]
    owners = [f"{section}.{key}" for section, fields in sections.items() if key in fields and section != here]
    if owners:
        return f"it belongs in another section: '{owners[0]}'"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    # Abbreviations and extensions (`lr_rate` for `lr`) score low in difflib.
    close = close or sorted((n for n in names if len(n) > 1 and (key.startswith(n) or n.startswith(key))), key=len)[-1:]
    where = f"{prefix}." if prefix else ""
    return f"did you mean '{where}{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
