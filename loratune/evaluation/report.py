"""`loratune report RUN_DIR`: one self-contained HTML page (PNGs inlined) a person can read and pass on:
the loss and eval curves, base vs fine-tuned metrics, sample generations, the data mix and the config."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import yaml

from ..config import config_to_dict
from ..curves import redraw
from ..runs import load_run_config, refuse_overwriting_in_a_peft_folder
from .compare import better_direction, column_names, question_of, sample_indices, table_rows
from .metrics import normalize_answer

STYLE = """
body{font:15px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1f2328;max-width:1040px;margin:32px auto;padding:0 24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #d8dee4;padding-bottom:6px}
.sub{color:#59636e;margin:0 0 20px}.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #d8dee4;border-radius:8px;padding:10px 14px;min-width:130px}.card b{display:block;font-size:20px}
.card span{color:#59636e;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%;font-size:14px}th,td{padding:6px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}.good{color:#1a7f37;font-weight:600}.bad{color:#cf222e}
.ok{color:#1a7f37}.miss{color:#cf222e}img{max-width:100%;border:1px solid #eaeef2;border-radius:6px}
pre{background:#f6f8fa;padding:12px;border-radius:6px;overflow:auto;font-size:13px}details summary{cursor:pointer;color:#0969da}
.muted{color:#59636e}
"""


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _img(path: Path) -> str:
    if not path.is_file():
        return "<p class=muted>(no curves yet)</p>"
    return f'<img alt="{path.name}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _fmt(value) -> str:
    return f"{value:,.4g}" if isinstance(value, float) else html.escape(str(value))


def _metrics_table(ev: dict) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in column_names(ev))
    rows = []
    for label, name, values in table_rows(ev):
        higher = better_direction(name)
        cells = [f'<td class="num">{v:.3f}</td>' for v in values]
        if len(values) > 1 and values[-1] != values[0]:
            better = abs(values[-1] - 1) < abs(values[0] - 1) if higher is None else (values[-1] > values[0]) == higher
            cells[-1] = f'<td class="num {"good" if better else "bad"}">{values[-1]:.3f}</td>'
        arrow = {True: "↑ higher is better", False: "↓ lower is better", None: "≈ 1 is best"}[higher]
        rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}<td class=muted>{arrow}</td></tr>")
    return f"<table><tr><th>metric ({html.escape(ev['data'])})</th>{head}<th></th></tr>{''.join(rows)}</table>"


def _samples(ev: dict, count: int) -> str:
    examples = ev["examples"]
    if not examples:
        return "<p class=muted>No generative examples in the evaluation data.</p>"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in column_names(ev))
    rows = []
    for i in sample_indices(len(examples), count):
        reference = examples[i]["reference"]
        cells = []
        for c in ev["columns"]:
            answer = ev[c]["predictions"][i]
            hit = normalize_answer(answer) == normalize_answer(reference)
            cells.append(f'<td><span class="{"ok" if hit else "miss"}">{"✓" if hit else "✗"}</span> {html.escape(answer)}</td>')
        rows.append(f"<tr><td>{html.escape(question_of(examples[i]['prompt']))}</td><td>{html.escape(reference)}</td>"
                    f"{''.join(cells)}</tr>")
    return f"<table><tr><th>prompt</th><th>expected</th>{head}</tr>{''.join(rows)}</table>"


def write_report(run_dir: str | Path, samples: int = 8) -> Path:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # says clearly when run_dir is not a run (a PEFT adapter folder is one)
    for name in ("report.html", "curves.png"):
        refuse_overwriting_in_a_peft_folder(run_dir, run_dir / name)
    redraw(run_dir)
    final = _read_json(run_dir / "final_metrics.json", {})
    ev = _read_json(run_dir / "eval.json", None)
    mix = _read_json(run_dir / "data_report.json", [])
    config = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    model = cfg.model.name
    cards = [("model", model), ("method", final.get("method", "lora")), ("steps", final.get("steps", "?")),
             ("final train loss", final.get("train_loss", "?")), ("train time", f"{final.get('train_seconds', 0):.0f} s"),
             ("trainable params", f"{final.get('trainable_parameters', 0):,}")]
    if final.get("best") is not None:
        cards.append(("best eval loss", final["best"]))
    parts = [f"<h1>loratune run · {html.escape(run_dir.name)}</h1>",
             f"<p class=sub>{html.escape(str(run_dir.resolve()))}</p>",
             "<div class=cards>" + "".join(f"<div class=card><span>{k}</span><b>{_fmt(v)}</b></div>" for k, v in cards) + "</div>",
             "<h2>Loss and evaluation curves</h2>", _img(run_dir / "curves.png"),
             "<h2>Base vs fine-tuned</h2>",
             _metrics_table(ev) if ev else f"<p class=muted>No evaluation yet: run <code>loratune eval {html.escape(str(run_dir))}</code> "
                                          "and then this report again.</p>",
             "<h2>Sample generations</h2>", _samples(ev, samples) if ev else "<p class=muted>(after loratune eval)</p>",
             "<h2>Data mix</h2>", "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in mix) + "</ul>" if mix
             else "<p class=muted>(not recorded)</p>",
             "<h2>Config</h2>", f"<details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>"]
    page = f"<!doctype html><html><head><meta charset=utf-8><title>loratune · {html.escape(run_dir.name)}</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, run_dir / "report.html")
    return run_dir / "report.html"
