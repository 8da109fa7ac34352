"""The run's model card (README.md), written with huggingface_hub's ModelCard: what a person finds on the hub page
or in the folder: the base, the LoRA settings, the data mix, the final metrics, the command and the version."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .config import Config


def card_text(cfg: Config, final: dict, data_report: list[str], base_name: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    lora = cfg.lora
    settings = (f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules {lora.target_modules}"
                + (", DoRA" if lora.use_dora else "") + (", rsLoRA" if lora.use_rslora else ""))
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in final.items() if v is not None and k != "interrupted")
    mix = "\n".join(f"- {line}" for line in data_report) or "- (not recorded)"
    data = ModelCardData(base_model=base_name, library_name="peft" if cfg.method == "lora" else "transformers",
                         tags=["loratune", "lora" if cfg.method == "lora" else "full-fine-tuning"])
    body = f"""# {Path(cfg.output_dir).name}

{"A LoRA adapter" if cfg.method == "lora" else "A fully fine-tuned model"} for `{base_name}`, trained with loratune {__version__}.

## Use it

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("{Path(cfg.output_dir).name}")
```

or `loratune chat RUN_DIR`, `loratune generate RUN_DIR --input prompts.txt --output answers.txt`.

## Training

- Method: {cfg.method}{f" ({settings})" if cfg.method == "lora" else ""}
- Steps: {final.get("steps")}, learning rate {cfg.train.lr}, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, max length {cfg.data.max_length}
- Command: `{" ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])}`

## Data mix

{mix}

## Final metrics

| metric | value |
|---|---|
{metrics}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def data_report_of(run_dir: Path) -> list[str]:
    path = run_dir / "data_report.json"
    return json.loads(path.read_text()) if path.is_file() else []
