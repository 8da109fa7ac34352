"""The run directory: what `loratune train` may create, replace or continue, decided before any slow work.

A run directory carries loratune's marker file. `--overwrite` replaces only a directory that carries it (or, for
runs made before the marker existed, one that holds nothing but files loratune writes); the old run is moved aside
and removed only once the new run has taken its first step, so a failed start leaves it as it was. Directories a
user can't afford to lose are never replaced, marker or not: the filesystem root, the home directory, the working
directory and its parents, and any directory that holds the config file or the data.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

from ..files import atomic_write

MARKER = ".loratune-run"

# What a run directory holds (loratune 0.1 wrote no marker): an old run is recognised by holding only these.
RUN_FILES = {"config.yaml", "data_report.json", "metrics.jsonl", "eval_history.json", "curves.png", "checkpoints",
             "tensorboard", "wandb", "final_metrics.json", "adapter_config.json", "adapter_model.safetensors",
             "model.safetensors", "config.json", "generation_config.json", "README.md", "report.html",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
             "merges.txt", "tokenizer.model", "added_tokens.json", ".wandb-run-id", ".mlflow-run-id", "initial_adapter",
             MARKER}


class RunDirError(RuntimeError):
    """The output directory can't be used as asked."""


def is_run(run_dir: Path) -> bool:
    """A loratune run: it carries the marker, or (made before the marker) a config.yaml among only run files."""
    if (run_dir / MARKER).is_file():
        return True
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    return "config.yaml" in names and all(n in RUN_FILES or n.startswith(("eval", ".tmp-")) for n in names)


def _holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def _never_replaced(run_dir: Path, protect: Iterable[Path]) -> Optional[str]:
    """Why `run_dir` must not be replaced even with --overwrite, or None."""
    target = run_dir.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        return "it is the filesystem root"
    if target == home:
        return "it is your home directory"
    if target == cwd or target in cwd.parents:
        return "it is the working directory or one of its parents"
    for path in protect:
        path = Path(path).expanduser().resolve()
        if path == target or target in path.parents:
            return f"it holds {path}, which this run reads"
    return None


def check_output_dir(run_dir: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse what can't work or would lose files, before any slow loading; creates and changes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} is a file, not a directory; choose another with --output_dir=DIR")
    existing = next((p for p in [run_dir, *run_dir.absolute().parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir {run_dir}: {existing} is not writable; choose another with --output_dir=DIR")
    if not _holds_files(run_dir):
        return
    if not overwrite:
        raise RunDirError(f"output_dir {run_dir} already holds files; choose another with --output_dir=DIR, "
                          "resume it with --resume, or pass --overwrite to replace that run")
    reason = _never_replaced(run_dir, protect)
    if reason:
        raise RunDirError(f"--overwrite refuses output_dir {run_dir}: {reason}. Nothing was touched; choose a "
                          "dedicated folder with --output_dir=DIR")
    if not is_run(run_dir):
        raise RunDirError(f"output_dir {run_dir} holds files but no loratune run (no {MARKER}); --overwrite only "
                          "replaces loratune runs, so nothing there was touched. Choose another --output_dir")


def begin(run_dir: Path, replace: bool) -> Optional[Path]:
    """Create the run directory with its marker. With `replace`, the old run is first renamed to a hidden sibling,
    which is returned: `finish_replacing` removes it once the new run has taken a step."""
    aside = None
    if replace and _holds_files(run_dir):
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(run_dir)
    if not (run_dir / MARKER).is_file():
        atomic_write(run_dir / MARKER, json.dumps({"tool": "loratune", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return aside


def finish_replacing(aside: Optional[Path]) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clear_leftovers(run_dir: Path) -> None:
    """Temporary folders of a final save that was killed half-way (the run's checkpoints still hold its state)."""
    for leftover in run_dir.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
