"""`loratune merge`: the adapter folded into its base, saved as a plain transformers model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

from ..timing import phases
from .load import load


def merge(run_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Fold the run's adapter into its base and save a plain transformers model (safetensors) with the tokenizer."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before the slow load
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; choose a new or empty one")
    with phases("model"):
        model, tok = load(run_dir, device="cpu", trust_remote_code=trust_remote_code)
    if not isinstance(model, PeftModel):
        raise ValueError(f"{run_dir} holds a fully fine-tuned model already; load it with from_pretrained({run_dir!s})")
    with phases("merge"):
        merged = model.merge_and_unload(progressbar=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        with phases("save"):
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; a merged model is for sharing
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
