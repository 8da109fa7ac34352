"""Run directories: everything is written to a temporary name first and renamed into place, so a
crash or Ctrl-C leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import Config, save_config

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RunDirError(RuntimeError):
    """The output directory can't be used as asked."""


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one; called before any slow loading, creates nothing."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"output_dir {run_dir} already holds files; choose another with --output_dir=DIR "
                          "or pass --overwrite to replace that run")


def save_run(model: PeftModel, tok: PreTrainedTokenizerBase, cfg: Config, run_dir: Path, final: dict) -> None:
    """Write adapter (PEFT format, safetensors), tokenizer + chat template, config and final metrics."""
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2))
        for f in tmp.iterdir():
            if f.is_file():
                os.replace(f, run_dir / f.name)
            else:
                shutil.rmtree(run_dir / f.name, ignore_errors=True)
                os.replace(f, run_dir / f.name)
