"""The sweep's result: one row per trial from its run directory (final_metrics.json, metrics.jsonl,
eval_history.json) and the storage (state, wall time), printed as a table and written to SWEEP_DIR/sweep.html with
the best held-out loss plotted against trainable parameters and against wall time."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional

from ..files import atomic_write
from .space import short
from .sweep import counted


def _read_json(path: Path) -> Optional[dict | list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_tokens_per_s(run_dir: Path) -> Optional[float]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["tokens_per_s"] if lines else None
    except (OSError, ValueError, KeyError):
        return None


def trial_rows(study, sweep_dir: Path) -> list[dict]:
    """Each counted trial with what its run recorded; a retried trial also lists the trials it continues."""
    rows = []
    for t in counted(study):
        run_dir = sweep_dir / t.user_attrs.get("run_dir", "-")
        final = _read_json(run_dir / "final_metrics.json") or {}
        history = _read_json(run_dir / "eval_history.json") or []
        losses = [e["eval_loss"] for e in history if "eval_loss" in e]
        gen = {k: v for e in history for k, v in e.items() if k.startswith("gen/")}  # the latest of each
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append({
            "trial": t.number, "settings": {k: short(v) for k, v in t.params.items()}, "run_dir": str(run_dir),
            "state": t.state.name.lower() + (f" (resumed {t.system_attrs['retry_history']})"
                                             if t.system_attrs.get("retry_history") else ""),
            "method": final.get("method"), "trainable": final.get("trainable_parameters"),
            "best_loss": min(losses) if losses else None, "gen": gen, "wall_s": wall,
            "tokens_per_s": _last_tokens_per_s(run_dir), "peak_gib": final.get("peak_gpu_gib"),
            "error": t.user_attrs.get("error")})
    return rows


def best_row(rows: list[dict]) -> Optional[dict]:
    done = [r for r in rows if r["state"].startswith("complete") and r["best_loss"] is not None]
    return min(done, key=lambda r: r["best_loss"]) if done else None


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The terminal table; the best trial named below it."""
    gen_keys = sorted({k for r in rows for k in r["gen"]})
    head = ["trial", "settings", "trainable", "best eval_loss", *gen_keys, "wall s", "tok/s", "peak GiB", "state"]
    body = [[str(r["trial"]), " ".join(f"{k}={v}" for k, v in r["settings"].items()), _fmt(r["trainable"], ","),
             _fmt(r["best_loss"], ".4f"), *(_fmt(r["gen"].get(k), ".3f") for k in gen_keys), _fmt(r["wall_s"], ".0f"),
             _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["peak_gib"], ".2f"), r["state"]] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = best_row(rows)
    settings = " ".join(f"{k}={v}" for k, v in best["settings"].items()) if best else ""
    lines.append(f"best: trial {best['trial']} ({settings}), eval_loss {best['best_loss']:.4f}, run {best['run_dir']}"
                 if best else "best: no trial completed yet")
    for r in rows:
        if r["error"]:
            lines.append(f"trial {r['trial']} failed: {r['error']}")
    return "\n".join(lines)


def _plot(rows: list[dict], x_key: str, x_label: str, log_x: bool) -> Optional[str]:
    """A PNG (base64) of best eval_loss against x_key, one labelled point per trial; None without points."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    points = [r for r in rows if r[x_key] is not None and r["best_loss"] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in sorted({r["method"] or "lora" for r in points}):
        mine = [r for r in points if (r["method"] or "lora") == method]
        ax.scatter([r[x_key] for r in mine], [r["best_loss"] for r in mine], label=method)
    for r in points:
        ax.annotate(str(r["trial"]), (r[x_key], r["best_loss"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("best held-out loss")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(sweep_dir: Path, rows: list[dict], text: str) -> Path:
    """SWEEP_DIR/sweep.html, self-contained (plots embedded), written whole or not at all."""
    images = [_plot(rows, "trainable", "trainable parameters", log_x=True),
              _plot(rows, "wall_s", "wall time (s)", log_x=False)]
    imgs = "".join(f'<img alt="plot" src="data:image/png;base64,{png}">' for png in images if png)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>loratune sweep: {html.escape(str(sweep_dir))}"
            "</title><style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}</style>"
            f"</head><body><h1>Sweep {html.escape(str(sweep_dir))}</h1><pre>{html.escape(text)}</pre>{imgs}"
            f"<h2>Trials</h2><pre>{html.escape(json.dumps(rows, indent=1, default=str))}</pre></body></html>")
    return atomic_write(sweep_dir / "sweep.html", page)
