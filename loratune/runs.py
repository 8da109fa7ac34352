"""Reading a run directory: shared by evaluation, inference and the report."""

from __future__ import annotations

from pathlib import Path

from .config import Config, load_config


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a loratune run directory (no config.yaml); pass the output_dir of `loratune train`")
    return load_config(path)
