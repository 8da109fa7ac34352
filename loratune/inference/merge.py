"""`loratune merge`: the adapter folded into its base, saved as a plain transformers model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from ..files import umask
from ..model.load import resolve_source
from ..runs import load_run_config
from ..timing import phases
from .load import load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(run_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False, dtype: str = "auto",
          base: str | None = None) -> Path:
    """Fold the run's adapter into its base and save a plain transformers model (safetensors) with the tokenizer.
    The sum is taken in the loaded precision, then saved as `dtype` (`auto`: the base's own dtype as its config
    declares it; for the embedded model that is its dequantized float32 copy)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use auto, {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before the slow load
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; choose a new or empty one")
    with phases("model"):
        model, tok = load(run_dir, device="cpu", trust_remote_code=trust_remote_code, base=base)
    if not isinstance(model, PeftModel):
        raise ValueError(f"{run_dir} holds a fully fine-tuned model already; load it with from_pretrained({run_dir!s})")
    with phases("merge"):
        merged = model.merge_and_unload(progressbar=True)
    merged = merged.to(DTYPES[dtype] if dtype != "auto" else declared_dtype(run_dir, base))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        with phases("save"):
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes the folder private; a merged model is for sharing
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def declared_dtype(run_dir: str | Path, base: str | None = None) -> torch.dtype:
    """The dtype the run's base declares in its config.json (float32 where it declares none)."""
    from transformers import AutoConfig

    cfg = load_run_config(run_dir, base=base)
    source, kwargs = resolve_source(cfg.model.name, cfg.model.gguf_cache_dir)
    declared = getattr(AutoConfig.from_pretrained(source, revision=cfg.model.revision, **kwargs), "dtype", None)
    return declared if declared in DTYPES.values() else torch.float32
