"""Reading a run directory: shared by evaluation, inference and the report.

A run directory may come from someone else, so what it says is not an instruction to run code: its config's
`trust_remote_code` is ignored (only the person at the keyboard can allow remote code, with --trust_remote_code in
that command), and weights load from safetensors only, never from a pickle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, load_config

PICKLES = ("adapter_model.bin", "pytorch_model.bin", "training_args.bin")


class RunError(RuntimeError):
    """The run directory can't be used; the message says why and what to do."""


def load_run_config(run_dir: str | Path, trust_remote_code: bool = False) -> Config:
    """The run's config, with `trust_remote_code` set by the caller (never by the file)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory; pass the output_dir of `loratune train`")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a loratune run directory (no config.yaml); pass the output_dir of "
                       "`loratune train`")
    cfg = load_config(path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, trust_remote_code=trust_remote_code))


def check_weights(run_dir: str | Path) -> None:
    """Refuse pickled weights: loading them could run code hidden in the file."""
    run_dir = Path(run_dir)
    for name in PICKLES:
        if (run_dir / name).is_file() and not any(run_dir.glob("*.safetensors")):
            raise RunError(f"{run_dir / name} is refused: it is a pickle, and unpickling can run code hidden in the "
                           "file. loratune loads safetensors only; convert it where you trust it (load it in PyTorch "
                           "and save with save_pretrained(..., safe_serialization=True))")
