"""Experiment tracking: metrics.jsonl always; TensorBoard when installed (on by default); Weights & Biases and
MLflow when asked for in train.report_to and installed; a PNG of the loss and eval curves, redrawn at each eval."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from ..curves import plot_curves, read_eval_history, read_metrics
from ..files import atomic_write

log = logging.getLogger("loratune")


class Tracker:
    def __init__(self, run_dir: Path, report_to: list[str], config: dict, resume_step: int = 0):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval_history.json"
        # On resume, drop what the interrupted run logged after its last checkpoint: those steps run again.
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= resume_step]
        self.train_points = [(r["step"], r["loss"]) for r in kept]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.eval_history = [e for e in read_eval_history(self.eval_path) if e["step"] <= resume_step]
        self.metrics_file = self.metrics_path.open("a")
        self.backends = []
        for name in report_to:
            if name not in ("tensorboard", "wandb", "mlflow"):
                raise ValueError(f"train.report_to: unknown tracker '{name}'; use tensorboard, wandb or mlflow")
            self.backends.append(_open_backend(name, run_dir, config, resume_step))
        self.backends = [b for b in self.backends if b is not None]

    def log_train(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.train_points.append((record["step"], record["loss"]))
        for backend in self.backends:
            backend(record["step"], {"train/loss": record["loss"], "train/lr": record["lr"],
                                     "train/tokens_per_s": record["tokens_per_s"]})

    def flush(self) -> None:
        self.metrics_file.flush()

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.eval_history.append({"step": step, **metrics})
        atomic_write(self.eval_path, json.dumps(self.eval_history, indent=2))
        for backend in self.backends:
            backend(step, {f"eval/{k}": v for k, v in metrics.items()})
        plot_curves(self.run_dir, self.train_points, self.eval_history)

    def close(self) -> None:
        self.metrics_file.close()
        plot_curves(self.run_dir, self.train_points, self.eval_history)
        for backend in self.backends:
            backend(None, None)


def _open_backend(name: str, run_dir: Path, config: dict, resume_step: int):
    """A function (step, metrics) -> None for one tracker; (None, None) closes it. None if unavailable.
    A resumed run continues the same tracker run: TensorBoard drops what was logged after the checkpoint (those
    steps run again), W&B and MLflow reopen the run whose id the first start saved in the run directory."""
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # on by default, so its absence is only worth a note
            log.info("tensorboard is not installed; skipping it (pip install tensorboard)")
            return None
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

        def tensorboard(step, metrics):
            if step is None:
                return writer.close()
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
        return tensorboard
    try:
        module = __import__(name)
    except ImportError:
        raise ValueError(f"train.report_to includes {name}, which is not installed: pip install {name}") from None
    if name == "wandb":  # WANDB_MODE=offline works without an account or network
        run = module.init(project=os.environ.get("WANDB_PROJECT", "loratune"), name=run_dir.name, config=config,
                          dir=str(run_dir), id=_run_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:12]),
                          resume="allow")
        return lambda step, metrics: run.finish() if step is None else run.log(metrics, step=step)
    module.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "loratune"))
    saved = run_dir / ".mlflow-run-id"
    if saved.is_file():
        module.start_run(run_id=saved.read_text().strip())
    else:
        atomic_write(saved, module.start_run(run_name=run_dir.name).info.run_id)
        module.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
    return lambda step, metrics: module.end_run() if step is None else module.log_metrics(
        {k.replace("/", "_"): v for k, v in metrics.items()}, step=step)


def _run_id(run_dir: Path, tracker: str, new) -> str:
    """The tracker's run id for this run directory: made at the first start, read back at every resume."""
    path = run_dir / f".{tracker}-run-id"
    if not path.is_file():
        atomic_write(path, new())
    return path.read_text().strip()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
