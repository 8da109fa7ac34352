"""The config half of the bad-input suite: every mistake fails at once (before any model loading), with exit 1,
the file and line or the --key, what is wrong and what to write instead, no traceback, and the user's files as they
were. Each case is one YAML file (or override) a user could write."""

import sys

import pytest
from badinput import check_bad

# (config text, needles the message must hold). The file is c.yaml in the working directory.
CASES = {
    "negative lr": ("train:\n  lr: -0.001\n", ["c.yaml:2", "train.lr", "above 0"]),
    "zero lr": ("train:\n  lr: 0\n", ["c.yaml:2", "train.lr", "above 0"]),
    "lora r 0": ("lora:\n  r: 0\n", ["c.yaml:2", "lora.r", "at least 1"]),
    "dropout 1.5": ("lora:\n  dropout: 1.5\n", ["c.yaml:2", "lora.dropout", "from 0 to 1"]),
    "alpha 0": ("lora:\n  alpha: 0\n", ["lora.alpha", "above 0"]),
    "device gpu": ("train:\n  device: gpu\n", ["c.yaml:2", "train.device", "write cuda"]),
    "device tpu": ("train:\n  device: tpu\n", ["train.device", "auto, cpu, cuda"]),
    "batch_size 0": ("train:\n  batch_size: 0\n", ["train.batch_size", "at least 1"]),
    "grad_accum 0": ("train:\n  grad_accum: 0\n", ["train.grad_accum", "at least 1"]),
    "max_steps 0": ("train:\n  max_steps: 0\n", ["train.max_steps", "at least 1"]),
    "max_steps -5": ("train:\n  max_steps: -5\n", ["train.max_steps", "at least 1"]),
    "num_epochs 0": ("train:\n  num_epochs: 0\n", ["train.num_epochs", "above 0"]),
    "warmup_ratio 1": ("train:\n  warmup_ratio: 1.0\n", ["train.warmup_ratio", "not included"]),
    "min_lr_ratio 2": ("train:\n  min_lr_ratio: 2\n", ["train.min_lr_ratio", "from 0 to 1"]),
    "grad_clip negative": ("train:\n  grad_clip: -1\n", ["train.grad_clip", "at least 0"]),
    "log_every 0": ("train:\n  log_every: 0\n", ["train.log_every", "at least 1"]),
    "save_every negative": ("train:\n  save_every: -2\n", ["train.save_every", "at least 0"]),
    "keep_checkpoints negative": ("train:\n  keep_checkpoints: -1\n", ["train.keep_checkpoints", "at least 0"]),
    "schedule cosinus": ("train:\n  schedule: cosinus\n", ["train.schedule", "cosine, linear, constant"]),
    "precision half": ("train:\n  precision: half\n", ["train.precision", "auto, fp32, bf16, fp16"]),
    "precision bfloat16": ("train:\n  precision: bfloat16\n", ["train.precision", "write bf16"]),
    "fp16 on cpu": ("train:\n  precision: fp16\n  device: cpu\n", ["train.precision", "needs a GPU"]),
    "resume yes": ("train:\n  resume: yes\n", ["c.yaml:2", "train.resume", "never, auto"]),
    "resume always": ("train:\n  resume: always\n", ["train.resume", "never, auto"]),
    "parallel zero": ("train:\n  parallel: zero3\n", ["train.parallel", "ddp, fsdp"]),
    "fast maybe": ("train:\n  fast: maybe\n", ["train.fast", "auto, on, off"]),
    "compile true": ("train:\n  compile: yes please\n", ["train.compile", "auto, on, off"]),
    "best_metric accuracy": ("train:\n  best_metric: accuracy\n", ["train.best_metric", "eval_loss"]),
    "unknown tracker": ("train:\n  report_to: [tensorbord]\n", ["train.report_to", "unknown tracker 'tensorbord'"]),
    "method qlora": ("method: qlora\n", ["c.yaml:1", "method", "lora, full"]),
    "model dtype": ("model:\n  dtype: fp8\n", ["model.dtype", "float32"]),
    "lora bias": ("lora:\n  bias: some\n", ["lora.bias", "none, all, lora_only"]),
    "lora init": ("lora:\n  init: kaiming\n", ["lora.init", "default, gaussian, pissa, olora"]),
    "truncation cut": ("data:\n  truncation: cut\n", ["data.truncation", "truncate, drop"]),
    "on_bad_record ignore": ("data:\n  on_bad_record: ignore\n", ["data.on_bad_record", "error, skip"]),
    "max_length 0": ("data:\n  max_length: 0\n", ["data.max_length", "at least 2"]),
    "eval_fraction 1.5": ("data:\n  datasets:\n    - path: demo\n      eval_fraction: 1.5\n",
                          ["c.yaml:4", "data.datasets[0].eval_fraction", "from 0 to 1"]),
    "weight negative": ("data:\n  datasets:\n    - path: demo\n      weight: -1\n", ["data.datasets[0].weight", "at least 0"]),
    "format qa": ("data:\n  datasets:\n    - format: qa\n", ["data.datasets[0].format", "chat, completion, text"]),
    "text_mode para": ("data:\n  datasets:\n    - text_mode: paragraphs\n", ["data.datasets[0].text_mode", "lines"]),
    "data_files without builder": ("data:\n  datasets:\n    - preset: squad\n      data_files: [squad.json]\n",
                                   ["data.datasets[0].data_files", "set hub to json"]),
    "eval max_new_tokens 0": ("eval:\n  max_new_tokens: 0\n", ["eval.max_new_tokens", "at least 1"]),
    "wrong type": ("train:\n  batch_size: eight\n", ["c.yaml:2", "train.batch_size", "expected int"]),
    "bool for int": ("lora:\n  r: true\n", ["lora.r", "expected int"]),
    "yes for a bool": ("train:\n  gradient_checkpointing: yes\n", ["c.yaml:2", "gradient_checkpointing",
                                                                    "expected true or false"]),
    "list for str": ("model:\n  name: [a, b]\n", ["model.name", "expected str"]),
    "section not a mapping": ("train: 5\n", ["train", "expected a mapping"]),
    "top level not a mapping": ("- a\n- b\n", ["expected a mapping"]),
    "unknown section": ("trian:\n  lr: 1\n", ["c.yaml:1", "unknown key 'trian'", "did you mean 'train'"]),
    "key in the wrong section": ("train:\n  r: 8\n", ["unknown key 'train.r'", "'lora.r'"]),
    "top-level seed": ("seed: 3\n", ["unknown key 'seed'", "'train.seed'"]),
    "duplicate key": ("train:\n  lr: 0.1\n  batch_size: 2\n  lr: 0.2\n", ["c.yaml", "line 4", "'lr' is given twice",
                                                                         "line 2"]),
    "invalid yaml": ("train:\n  lr: [1, 2\n", ["c.yaml:3", "invalid YAML"]),
    "empty file": ("", ["c.yaml is empty"]),
    "only a comment": ("# nothing yet\n", ["c.yaml is empty"]),
    "several problems at once": ("train:\n  lr: -1\n  batch_size: 0\nlora:\n  r: 0\n",
                                 ["3 problems", "c.yaml:2", "c.yaml:3", "c.yaml:5"]),
}

# Names from HF TrainingArguments, TRL, Axolotl and peft: each must point at loratune's own key.
FOREIGN = {
    "learning_rate": "train.lr", "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "num_train_epochs": "train.num_epochs", "logging_steps": "train.log_every", "save_steps": "train.save_every",
    "eval_steps": "train.eval_every", "save_total_limit": "train.keep_checkpoints", "max_grad_norm": "train.grad_clip",
    "lr_scheduler_type": "train.schedule", "bf16": "train.precision", "fp16": "train.precision",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length", "sample_packing": "data.packing", "base_model": "model.name",
    "model_name_or_path": "model.name", "eval_strategy": "train.eval_every", "load_best_model_at_end": "train.best_metric",
    "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay", "gradient_checkpointing":
    "train.gradient_checkpointing", "early_stopping_patience": "train.early_stopping_patience",
    "target_modules": "lora.target_modules", "dataset_text_field": "data.datasets[].fields", "torch_dtype": "model.dtype",
}


def write(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)


@pytest.mark.parametrize("name", CASES)
def test_bad_config_for_train(name, tmp_path):
    text, needles = CASES[name]
    write(tmp_path, text)
    check_bad(["train", "c.yaml"], tmp_path, *needles, code=1)


@pytest.mark.parametrize("name", ["negative lr", "dropout 1.5", "duplicate key", "empty file", "unknown section"])
def test_bad_config_for_doctor(name, tmp_path):
    text, needles = CASES[name]
    write(tmp_path, text)
    check_bad(["doctor", "c.yaml"], tmp_path, *needles, code=1)


@pytest.mark.parametrize("foreign", FOREIGN)
def test_names_from_other_tools_point_at_ours(foreign, tmp_path):
    write(tmp_path, f"{foreign}: 1\n")
    check_bad(["train", "c.yaml"], tmp_path, "c.yaml:1", f"unknown key '{foreign}'", f"'{FOREIGN[foreign]}",
              code=1)


@pytest.mark.parametrize("argv,needles", [
    (["--train.lr=-1"], ["--train.lr", "above 0"]),
    (["--train.learning_rate=1e-4"], ["--train.learning_rate", "loratune calls it 'train.lr'"]),
    (["--lora.r", "0"], ["--lora.r", "at least 1"]),
    (["--train.device=gpu"], ["--train.device", "write cuda"]),
    (["--train.lr"], ["--train.lr has no value", "--train.lr=VALUE"]),
    (["train.lr=1"], ["no such config file", "--train.lr=1"]),
])
def test_bad_override(argv, needles, tmp_path):
    check_bad(["train", *argv], tmp_path, *needles, code=1)


def test_a_tracker_that_is_not_installed_fails_before_anything_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then says it is not there
    write(tmp_path, "train:\n  report_to: [wandb]\n")
    check_bad(["train", "c.yaml"], tmp_path, "train.report_to", "pip install wandb", code=1)
    assert not (tmp_path / "runs").exists()  # no run folder left to block the next try


def test_a_config_built_in_python_is_checked_like_a_file(tmp_path):
    from loratune.config import Config, ConfigError, load_config
    from loratune.training.recipe import train

    cfg = Config()
    cfg.train.batch_size = 0
    cfg.lora.r = -1
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*lora.r: -1 should be at least 1.*train.batch_size: 0 should be at least 1"):
        train(cfg)
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'; loratune calls it 'train.lr'"):
        load_config({"train": {"learning_rate": 1e-4}})
    assert load_config({"train": {"lr": 1e-4}}).train.lr == 1e-4


def test_bad_config_in_a_separate_process_prints_no_traceback(tmp_path):
    write(tmp_path, "train:\n  lr: -1\n")
    check_bad(["train", "c.yaml"], tmp_path, "c.yaml:2", "train.lr", code=1, process=True)
