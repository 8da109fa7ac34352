"""What `loratune serve` serves: one base model with every run's adapter on it, each under its own name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ..config import Config
from ..device import pick_device
from ..model.load import load_adapter, load_base_model, load_tokenizer
from ..runs import RunError, check_weights, load_run_config, tokenizer_source
from .engine import BASE


@dataclass
class Served:
    model: torch.nn.Module
    """A PeftModel holding every adapter (or, for one fully fine-tuned run, that model)."""
    adapters: dict[str, str]
    """Public model name -> its adapter's name in `model` (BASE for the base model)."""
    tokenizers: dict[str, PreTrainedTokenizerBase]
    """Public model name -> its tokenizer, with the chat template the run trained with."""
    context: int
    """The most tokens a prompt and its completion may hold together."""
    base: str


def parse_specs(specs: list[str], trust_remote_code: bool = False, base: str | None = None) -> list[tuple[str, Path, Config]]:
    """`RUN_DIR` or `NAME=RUN_DIR` -> (name, dir, config), checked before any model loads: every run exists, holds
    safetensors, and all share one base."""
    out = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        path = Path(path)
        cfg = load_run_config(path, trust_remote_code, base)
        check_weights(path)
        name = name or path.resolve().name
        if any(name == seen for seen, _, _ in out):
            raise RunError(f"two runs would be served as '{name}'; name them: NAME={path}")
        out.append((name, path, cfg))
    first = out[0][2].model
    for name, path, cfg in out[1:]:
        if (cfg.model.name, cfg.model.revision) != (first.name, first.revision):
            raise RunError(f"{path} was trained on {cfg.model.name}, {out[0][1]} on {first.name}: one server serves "
                           "adapters of one base model; start one server per base")
    full = [str(path) for _, path, cfg in out if cfg.method == "full"]
    if full and len(out) > 1:
        raise RunError(f"{', '.join(full)}: a fully fine-tuned run is a model of its own; serve it alone")
    if base_name(first.name) in {name for name, _, _ in out}:
        raise RunError(f"'{base_name(first.name)}' names the base model; give the run another name: NAME=RUN_DIR")
    return out


def base_name(model_name: str) -> str:
    """The base model's public name: what `model.name` says (a local folder by its folder name)."""
    return Path(model_name).name if Path(model_name).expanduser().exists() else model_name


def load_served(runs: list[tuple[str, Path, Config]], device: str = "auto") -> Served:
    """Load the base once and put every run's adapter on it, unmerged, so one forward pass can serve them all."""
    device_ = pick_device(device)
    first = runs[0][2]
    if first.method == "full":
        name, path, cfg = runs[0]
        model = load_base_model(dataclasses.replace(cfg.model, name=str(path)), device_)
        tok = load_tokenizer(cfg.model, source=tokenizer_source(path))
        return Served(model.eval(), {name: BASE}, {name: tok}, context_length(model), name)
    model = load_adapter(load_base_model(first.model, device_), runs[0][1])  # peft names it "default"
    names: dict[str, str] = {base_name(first.model.name): BASE}
    tokenizers = {base_name(first.model.name): load_tokenizer(first.model)}
    for i, (name, path, cfg) in enumerate(runs):
        names[name] = "default" if i == 0 else f"adapter_{i}"  # the public name may hold any character
        if i:
            model.load_adapter(str(path), adapter_name=names[name])
        tokenizers[name] = load_tokenizer(cfg.model, source=tokenizer_source(path))
    return Served(model.eval(), names, tokenizers, context_length(model), base_name(first.model.name))


def context_length(model: torch.nn.Module) -> int:
    config = (model.get_base_model() if isinstance(model, PeftModel) else model).config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 2048
