"""Reading a run's metrics files and drawing curves.png: shared by training (redrawn at each eval) and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line torn by a killed process is dropped (its step runs again)."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_eval_history(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def redraw(run_dir: Path) -> None:
    """curves.png from the run's files as they are (the report calls this; it writes nothing else)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(run_dir, [(r["step"], r["loss"]) for r in records], read_eval_history(run_dir / "eval_history.json"))


def plot_curves(run_dir: Path, train_points: list[tuple[int, float]], eval_history: list[dict]) -> None:
    """curves.png: training loss per step and held-out loss per eval."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train_points:
        ax.plot(*zip(*train_points), label="train loss", color="#4C72B0", linewidth=1)
    for key in sorted({k for e in eval_history for k in e if k.endswith("loss")}):
        points = [(e["step"], e[key]) for e in eval_history if key in e]
        ax.plot(*zip(*points), marker="o", label=key.replace("_", " "))
    losses = [v for _, v in train_points if v > 0] + [e[k] for e in eval_history for k in e
                                                          if k.endswith("loss") and e[k] > 0]
    if losses and max(losses) / min(losses) > 50:  # late, small losses would sit flat on the axis otherwise
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run_dir.name)
    fig.tight_layout()
    tmp = run_dir / ".curves.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run_dir / "curves.png")
