"""Run directories and checkpoints. Everything is written under a temporary name and renamed into place, so a
crash, SIGKILL or Ctrl-C leaves the old checkpoint or the new one, never half of one.

A checkpoint (run_dir/checkpoints/step-000050/) holds what exact resume needs: the trainable weights
(safetensors), optimizer, scheduler and grad-scaler state (torch files loaded with weights_only=True), the RNG
states of random, numpy, torch and every CUDA device, and the data position (micro-batches consumed).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from transformers import PreTrainedTokenizerBase

from ..card import card_text, data_report_of
from ..config import Config, save_config
from ..files import atomic_write
from ..model.load import portable_base_name
from .rundir import RunDirError

CHECKPOINTS = "checkpoints"
log = logging.getLogger("loratune")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temporary directory into place; the old one (if any) goes only once the new one is there."""
    old = dst.with_name(f".old-{dst.name}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


INITIAL_ADAPTER = "initial_adapter"  # peft loads it under its folder name, which can't start with "."


def converted_init(cfg: Config) -> bool:
    """PiSSA and OLoRA start by moving part of each base weight into the adapter: the final adapter is converted
    back (peft's path_initial_model_for_weight_conversion) so that it fits the original base."""
    return cfg.method == "lora" and cfg.lora.init in ("pissa", "olora") and not cfg.model.adapter


def save_initial_adapter(model: torch.nn.Module, run_dir: Path) -> None:
    """The adapter as initialised, before any step: what the conversion at the end subtracts."""
    for peft_config in model.peft_config.values():
        peft_config.init_lora_weights = True  # as peft asks: the saved initial adapter is loaded as a plain one
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp-"))  # a kill leaves it to rundir.clear_leftovers
    model.save_pretrained(tmp, safe_serialization=True, **embedding_choice(model))
    _replace_dir(tmp, run_dir / INITIAL_ADAPTER)


def save_weights(model: torch.nn.Module, tok: Optional[PreTrainedTokenizerBase], folder: Path,
                 state_dict: Optional[dict] = None, initial: Optional[Path] = None) -> None:
    """PEFT adapter (adapter_config.json + adapter_model.safetensors) or, for full fine-tuning, the whole model.
    `state_dict`: the full weights of a sharded (FSDP) model, gathered by every rank. `initial`: a PiSSA/OLoRA run's
    initial adapter, to convert the saved one into an adapter of the original base."""
    extra = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict, **extra, **embedding_choice(model))
    if tok is not None:
        tok.save_pretrained(folder)


def embedding_choice(model: torch.nn.Module) -> dict:
    """peft's default, save_embedding_layers="auto", asks the hub at every save whether the base's vocabulary was
    resized (it fetches the base's config.json): offline, that is a warning at every checkpoint, and behind a
    firewall a wait. loratune never resizes the vocabulary, so the answer is known: save the embeddings only when
    the adapter targets them, as "auto" decides without asking."""
    if not hasattr(model, "peft_config"):
        return {}  # full fine-tuning: the whole model is saved
    targeted = any(name in (c.target_modules or ()) for c in model.peft_config.values() for name in EMBEDDING_LAYER_NAMES)
    return {"save_embedding_layers": "auto" if targeted else False}


def save_run(model: torch.nn.Module, tok: PreTrainedTokenizerBase, cfg: Config, run_dir: Path, final: dict,
             state_dict: Optional[dict] = None) -> None:
    """Write the final weights, tokenizer + chat template, config and final metrics into the run directory."""
    for peft_config in getattr(model, "peft_config", {}).values():
        peft_config.base_model_name_or_path = portable_base_name(cfg.model.name)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-") as tmp:
        tmp = Path(tmp)
        save_weights(model, tok, tmp, state_dict, run_dir / INITIAL_ADAPTER if converted_init(cfg) else None)
        save_config(cfg, tmp / "config.yaml")
        atomic_write(tmp / "final_metrics.json", json.dumps(final, indent=2))
        # replaces peft's empty template
        atomic_write(tmp / "README.md", card_text(cfg, final, data_report_of(run_dir), portable_base_name(cfg.model.name)))
        for f in tmp.iterdir():
            if f.is_file():
                os.replace(f, run_dir / f.name)
            else:
                _replace_dir(f, run_dir / f.name)


def rng_state() -> tuple[dict, dict]:
    """(JSON-able states of random and numpy, tensor states of torch and CUDA)."""
    np_state = np.random.get_state()
    plain = {"random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    version, state, gauss = plain["random"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer_state: dict, scheduler, scaler,
                    state: dict, keep: int, protect: Optional[str] = None, rngs: Optional[list[tuple[dict, dict]]] = None,
                    weights: Optional[dict] = None) -> Path:
    """Write checkpoints/step-N atomically, then keep the newest `keep` (and `protect`, the best one).
    `rngs`: every rank's rng_state() in a distributed run (rank 0's goes to rng.pt, rank r's to rng-rank{r}.pt);
    `weights`: the gathered full weights of a sharded model."""
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-step-{step:06d}-"))
    save_weights(model, None, tmp, weights)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
    (plain, tensors), *others = rngs or [rng_state()]
    torch.save(tensors, tmp / "rng.pt")
    for rank, (other_plain, other_tensors) in enumerate(others, start=1):
        torch.save({"plain": other_plain, "tensors": other_tensors}, tmp / f"rng-rank{rank}.pt")
    atomic_write(tmp / "state.json", json.dumps({**state, "step": step, "rng": plain}))
    _replace_dir(tmp, final)
    for old in completed_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def completed_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written ones (.tmp-*) are never listed."""
    folder = run_dir / CHECKPOINTS
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest finished checkpoint; leftovers of an interrupted write are removed first."""
    folder = run_dir / CHECKPOINTS
    if folder.is_dir():
        for leftover in folder.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in folder.glob(".old-*"):  # a crash between the two renames of _replace_dir
            target = folder / leftover.name[len(".old-"):]
            if target.exists():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                os.replace(leftover, target)
    done = completed_checkpoints(run_dir)
    return done[-1] if done else None


def resume_point(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that is whole: one whose files don't read back (a disk that filled up, a copy cut
    short) is moved aside as checkpoints/.damaged-step-N with a warning, and the one before it is used."""
    for path in reversed(completed_checkpoints(run_dir)):
        problem = damage(path)
        if problem is None:
            return path
        aside = path.with_name(f".damaged-{path.name}")
        os.replace(path, aside)
        log.warning("checkpoint %s is damaged (%s); moved it to %s and resuming from the one before", path.name,
                    problem, aside)
    return None


def damage(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files, or None. Reads them whole (they are small for an adapter)."""
    from safetensors import safe_open

    try:
        json.loads((path / "state.json").read_text())
        weights = next(path.glob("*.safetensors"), None)
        if weights is None:
            return "no weights file"
        with safe_open(weights, "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        _load_torch(path / "optimizer.pt")
        _load_torch(path / "rng.pt")
    except RunDirError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read back means damaged; the message says which
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'unreadable'}"
    return None


def _load_torch(path: Path):
    """torch.load of tensors and plain data only. A file that holds other Python objects was not written by
    loratune: it is refused, never unpickled."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise RunDirError(f"{path} is refused: it holds Python objects, and loratune loads checkpoints with "
                          "weights_only=True (tensors and plain data) so that a file can't run code. It was not "
                          "written by loratune; remove that checkpoint folder to resume from an earlier one") from None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Put a checkpoint's weights into the (not yet wrapped or sharded) model."""
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(weights))
        return
    # method: full. Tied weights (an LM head sharing the embedding) are stored once, so strict=False...
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in current if k not in missing}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]  # ...but nothing else may be absent
    if unexpected or untied:
        raise RunDirError(f"{path}: checkpoint does not match the model (missing {untied[:5]}, unexpected {unexpected[:5]})")


def load_training_state(path: Path, load_optimizer, scheduler, scaler, rank: int = 0) -> dict:
    """Restore the optimizer (through `load_optimizer(saved_state)`), scheduler, scaler and RNG states that
    save_checkpoint wrote; return its state (step, batches consumed, ...). Rank r restores its own RNG
    states; a rank the saving run did not have (resumed on more processes) keeps its fresh seed."""
    saved = _load_torch(path / "optimizer.pt")
    load_optimizer(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    state = json.loads((path / "state.json").read_text())
    plain = state.pop("rng")
    if rank == 0:
        set_rng_state(plain, _load_torch(path / "rng.pt"))
    elif (path / f"rng-rank{rank}.pt").is_file():
        saved_rng = _load_torch(path / f"rng-rank{rank}.pt")
        set_rng_state(saved_rng["plain"], saved_rng["tensors"])
    return state
