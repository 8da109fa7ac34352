"""Experiment tracking: metrics.jsonl always; TensorBoard when installed (on by default); Weights & Biases and
MLflow when asked for in train.report_to and installed; a PNG of the loss and eval curves, redrawn at each eval."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("loratune")


class Tracker:
    def __init__(self, run_dir: Path, report_to: list[str], config: dict, resume_step: int = 0):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_path = run_dir / "eval_history.json"
        # On resume, drop what the interrupted run logged after its last checkpoint: those steps run again.
        kept = [r for r in self._records(self.metrics_path) if r["step"] <= resume_step]
        self.train_points = [(r["step"], r["loss"]) for r in kept]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.eval_history = [e for e in self._json(self.eval_path) if e["step"] <= resume_step]
        self.metrics_file = self.metrics_path.open("a")
        self.backends = []
        for name in report_to:
            if name not in ("tensorboard", "wandb", "mlflow"):
                raise ValueError(f"train.report_to: unknown tracker '{name}'; use tensorboard, wandb or mlflow")
            self.backends.append(_open_backend(name, run_dir, config))
        self.backends = [b for b in self.backends if b is not None]

    @staticmethod
    def _records(path: Path) -> list[dict]:
        """metrics.jsonl's records; a line torn by a killed process is dropped (its step runs again)."""
        out = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    @staticmethod
    def _json(path: Path) -> list[dict]:
        return json.loads(path.read_text()) if path.is_file() else []

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
        tmp = self.eval_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.eval_history, indent=2))
        os.replace(tmp, self.eval_path)
        for backend in self.backends:
            backend(step, {f"eval/{k}": v for k, v in metrics.items()})
        self.plot()

    def plot(self) -> None:
        """curves.png: training loss per step and held-out loss per eval."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        if self.train_points:
            ax.plot(*zip(*self.train_points), label="train loss", color="#4C72B0", linewidth=1)
        for key in sorted({k for e in self.eval_history for k in e if k.endswith("loss")}):
            points = [(e["step"], e[key]) for e in self.eval_history if key in e]
            ax.plot(*zip(*points), marker="o", label=key.replace("_", " "))
        losses = [v for _, v in self.train_points if v > 0] + [e[k] for e in self.eval_history for k in e
                                                              if k.endswith("loss") and e[k] > 0]
        if losses and max(losses) / min(losses) > 50:  # late, small losses would sit flat on the axis otherwise
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(self.run_dir.name)
        fig.tight_layout()
        tmp = self.run_dir / ".curves.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.run_dir / "curves.png")

    def close(self) -> None:
        self.metrics_file.close()
        self.plot()
        for backend in self.backends:
            backend(None, None)


def _open_backend(name: str, run_dir: Path, config: dict):
    """A function (step, metrics) -> None for one tracker; (None, None) closes it. None if unavailable."""
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # on by default, so its absence is only worth a note
            log.info("tensorboard is not installed; skipping it (pip install tensorboard)")
            return None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

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
                          dir=str(run_dir))
        return lambda step, metrics: run.finish() if step is None else run.log(metrics, step=step)
    module.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "loratune"))
    module.start_run(run_name=run_dir.name)
    module.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})
    return lambda step, metrics: module.end_run() if step is None else module.log_metrics(
        {k.replace("/", "_"): v for k, v in metrics.items()}, step=step)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
