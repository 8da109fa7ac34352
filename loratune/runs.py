"""Reading a run directory: shared by evaluation, inference, export and the report.

A run directory may come from someone else, so what it says is not an instruction to run code: its config's
`trust_remote_code` is ignored (only the person at the keyboard can allow remote code, with --trust_remote_code in
that command), and weights load from safetensors only, never from a pickle.

Besides loratune's own runs, any PEFT adapter folder (adapter_config.json + adapter_model.safetensors, as peft's
save_pretrained writes it) is read as a run: its base from adapter_config.json (or `base`), its tokenizer from the
folder when it has one, else from the base. It has no data of its own, so evaluating it needs a file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from .config import Config, DataConfig, ModelConfig, load_config

PICKLES = ("adapter_model.bin", "pytorch_model.bin", "training_args.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class RunError(RuntimeError):
    """The run directory can't be used; the message says why and what to do."""


def load_run_config(run_dir: str | Path, trust_remote_code: bool = False, base: Optional[str] = None) -> Config:
    """The run's config (or a PEFT adapter folder's, as a run), with `trust_remote_code` set by the caller (never by
    the file) and the base replaced by `base` when given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory; pass the output_dir of `loratune train` or a PEFT adapter "
                       "folder")
    if (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml")
    elif (run_dir / "adapter_config.json").is_file():
        cfg = _adapter_as_run(run_dir, base)
    else:
        raise RunError(f"{run_dir} is not a loratune run directory (no config.yaml) nor a PEFT adapter (no "
                       "adapter_config.json); pass the output_dir of `loratune train`")
    model = dataclasses.replace(cfg.model, trust_remote_code=trust_remote_code, **({"name": base} if base else {}))
    return dataclasses.replace(cfg, model=model)


def _adapter_as_run(run_dir: Path, base: Optional[str]) -> Config:
    try:
        saved = json.loads((run_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{run_dir / 'adapter_config.json'}:{e.lineno}: not valid JSON ({e.msg})") from None
    name = base or saved.get("base_model_name_or_path")
    if not name:
        raise RunError(f"{run_dir / 'adapter_config.json'} names no base model; pass --base MODEL")
    if saved.get("peft_type", "LORA") != "LORA":
        raise RunError(f"{run_dir} holds a {saved.get('peft_type')} adapter; loratune works with LoRA adapters")
    return Config(model=ModelConfig(name=name), data=DataConfig(datasets=[]), output_dir=str(run_dir))


def is_peft_folder(run_dir: str | Path) -> bool:
    """A PEFT adapter folder that is not a loratune run (no config.yaml: no data, no training settings)."""
    return not (Path(run_dir) / "config.yaml").is_file()


def refuse_overwriting_in_a_peft_folder(run_dir: str | Path, path: str | Path) -> None:
    """A PEFT folder from elsewhere is the user's: a file of the name loratune would write is not replaced."""
    if is_peft_folder(run_dir) and Path(path).exists():
        raise RunError(f"{path} already exists in {run_dir}, a folder loratune did not make; nothing was replaced. "
                       "Move that file, or write elsewhere (eval: --out FILE)")


def tokenizer_source(run_dir: str | Path) -> Optional[str]:
    """Where the run's tokenizer is: the folder when it holds one, else None (the base's)."""
    return str(run_dir) if any((Path(run_dir) / name).is_file() for name in TOKENIZER_FILES) else None


def check_weights(run_dir: str | Path) -> None:
    """Refuse pickled weights: loading them could run code hidden in the file."""
    run_dir = Path(run_dir)
    for name in PICKLES:
        if (run_dir / name).is_file() and not any(run_dir.glob("*.safetensors")):
            raise RunError(f"{run_dir / name} is refused: it is a pickle, and unpickling can run code hidden in the "
                           "file. loratune loads safetensors only; convert it where you trust it (load it in PyTorch "
                           "and save with save_pretrained(..., safe_serialization=True))")
