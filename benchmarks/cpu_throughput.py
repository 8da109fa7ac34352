"""CPU training throughput: loratune's train() against a plain peft loop, side by side in one process.

Run (a few minutes on a 2-core CPU):
    python benchmarks/cpu_throughput.py --out benchmarks/results/cpu-throughput.json

The job is `make demo`'s: the embedded SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, the embedded demo chats
(about 50 tokens each, 24% of them trained), 8 examples (or 8 packed rows of 128 tokens) per step, fp32 weights.
The peer is the loop most tutorials show: padded batches of 8, `model(**batch).loss` (logits over every position),
AdamW, gradient clipping. Each setup trains `--steps` steps per round and the rounds interleave the setups, so a
machine shared with other work slows every setup alike; the table gives the median round. tokens/s counts real
(non-pad) tokens after the first `--warmup` steps of each round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loratune.config import load_config  # noqa: E402
from loratune.data.examples import collate, load_data  # noqa: E402
from loratune.model import loss  # noqa: E402
from loratune.model.load import load_base_model, load_tokenizer, prepare_for_training  # noqa: E402
from loratune.training.recipe import train  # noqa: E402

# name -> train-config overrides; "auto" is whatever loratune picks on this machine by default.
SETUPS = {"auto": {}, "padded": {"fast": "off"}, "packed": {"fast": "on"},
          "padded-bf16": {"fast": "off", "precision": "bf16"}, "packed-bf16": {"fast": "on", "precision": "bf16"},
          "auto-padded-rows": {}}
# Setups that change a loss constant for their runs: "auto-padded-rows" keeps every batch in padded rows (the
# shared prefix through a KV cache, as before one_row), to compare both layouts in one process.
ONE_ROW_MAX_TOKENS = {"auto-padded-rows": 0}


def run_peer(cfg, tok, train_set, steps: int, warmup: int) -> float:
    """A plain peft loop on padded batches; tokens/s after `warmup` steps."""
    model = prepare_for_training(load_base_model(cfg.model, torch.device("cpu")), cfg.method, cfg.lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
    bs, tokens, start = cfg.train.batch_size, 0, 0.0
    for step in range(steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        batch = collate([train_set[order[(step * bs + i) % len(order)]] for i in range(bs)], tok.pad_token_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def run_loratune(cfg, overrides: dict, steps: int, warmup: int, out: Path) -> float:
    """loratune's train() with these overrides; tokens/s from its metrics.jsonl after `warmup` steps."""
    run_cfg = dataclasses.replace(cfg, output_dir=str(out), train=dataclasses.replace(
        cfg.train, max_steps=steps, eval_every=0, report_to=[], **overrides))
    train(run_cfg, overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["padded", "packed", "auto"], choices=sorted(SETUPS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cpu-throughput.json")
    args = parser.parse_args()

    cfg = load_config(None)  # the shipped default: make demo's job
    tok = load_tokenizer(cfg.model)
    train_set = load_data(cfg.data, tok, cfg.train.seed)[0]
    tmp = Path(tempfile.mkdtemp())
    rates: dict[str, list[float]] = {"peer": [], **{s: [] for s in args.setups}}
    one_row_default = loss.ONE_ROW_MAX_TOKENS
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        rates["peer"].append(run_peer(cfg, tok, train_set, args.steps, args.warmup))
        for name in args.setups:
            loss.ONE_ROW_MAX_TOKENS = ONE_ROW_MAX_TOKENS.get(name, one_row_default)
            rates[name].append(run_loratune(cfg, SETUPS[name], args.steps, args.warmup, tmp / name))
        print({k: [round(v) for v in vs] for k, vs in rates.items()}, flush=True)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_avg_1min": [load_before, os.getloadavg()[0]], "steps": args.steps, "warmup": args.warmup,
               "tokens_per_s": rates}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(format_table(results))


def format_table(results: dict) -> str:
    peer = statistics.median(results["tokens_per_s"]["peer"])
    lines = [f"torch {results['torch']}, {results['threads']} threads on {results['cpus']} CPUs, 1-min load "
             f"{results['load_avg_1min'][0]:.1f} before / {results['load_avg_1min'][1]:.1f} after", "",
             "| setup | tokens/s (median) | per round | ÷ peer |", "|---|---:|---|---:|"]
    for name, values in results["tokens_per_s"].items():
        label = "peer: plain peft loop, padded b8" if name == "peer" else f"loratune {name} {SETUPS[name] or ''}"
        mid = statistics.median(values)
        lines.append(f"| {label} | {mid:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | {mid / peer:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
