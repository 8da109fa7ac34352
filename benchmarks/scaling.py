"""Scaling on several GPUs: 1 GPU against N for the same global batch, as a user runs it (`loratune train` and
`loratune train --nproc N`, whole processes), DDP and FSDP, compiled and not.

Run on a machine with N GPUs (a few minutes per shape on two H200s):
    python benchmarks/scaling.py --shapes gpt2 --nproc 2 --out scaling.json

Models are random-init at their real shapes with LoRA r=8, packed rows of 1,024 tokens, log-normal example lengths
(as benchmarks/throughput.py). One GPU trains `grad_accum` = N micro-batches of 16 rows per step; N GPUs train one
each, so every run sees the same global batch and data order. tokens/s is measured between step `--warmup` and the
last step from metrics.jsonl (capture and compilation excluded); the losses are compared step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import TARGETS, example_lengths, save_model, write_texts  # noqa: E402

MODES = [("ddp", "off"), ("ddp", "on"), ("fsdp", "off")]  # (train.parallel, train.compile)


def write_config(model_dir: Path, data: Path, out: Path, shape: str, world: int, parallel: str, compile_: str,
                 steps: int, method: str = "lora", **train_kw) -> Path:
    cfg = {"method": method, "model": {"name": str(model_dir), "dtype": "bfloat16"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS[shape]},
           "data": {"datasets": [{"path": str(data), "format": "text"}], "max_length": 1024, "cache_dir": None,
                    "max_samples_per_dataset": None},
           "train": {"batch_size": 16, "grad_accum": world, "max_steps": steps, "lr": 2e-4, "report_to": [],
                     "parallel": parallel, "compile": compile_, "log_every": 10, "save_every_minutes": 0, **train_kw},
           "output_dir": str(out)}
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(cfg))
    return config


def run(model_dir: Path, data: Path, out: Path, shape: str, nproc: int, world: int, parallel: str, compile_: str,
        steps: int, method: str = "lora") -> dict:
    config = write_config(model_dir, data, out, shape, world, parallel, compile_, steps, method)
    cmd = [sys.executable, "-m", "loratune", "train", str(config)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final_metrics.json").read_text())
    return {"records": records, "peak_gib": final["peak_gpu_gib"], "wall_s": wall}


def run_two_nodes(model_dir: Path, data: Path, out: Path, shape: str, steps: int) -> dict:
    """Multi-node as a cluster runs it, on one host: two torchrun invocations (--nnodes 2, --node_rank 0/1), one GPU
    each (CUDA_VISIBLE_DEVICES), meeting at 127.0.0.1 over NCCL."""
    config = write_config(model_dir, data, out, shape, 2, "ddp", "off", steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", "--master_port=29517"]
    procs = [subprocess.Popen([*cmd, f"--node_rank={rank}", "-m", "loratune", "train", str(config)],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        return {"error": "".join(e[-800:] for e in errors)}
    return {"records": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]}


def tokens_per_s(records: list[dict], warmup: int) -> float:
    first = next(r for r in records if r["step"] >= warmup)
    last = records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["gpt2"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="scaling.json")
    parser.add_argument("--two-nodes", action="store_true", help="also: 2 nodes x 1 GPU on this host, DDP, vs 1 GPU")
    parser.add_argument("--modes", nargs="+", default=[f"{p}:{c}" for p, c in MODES],
                        help="parallel:compile pairs to run (default: all)")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        write_texts(data, example_lengths(20_000))
        for shape in args.shapes:
            model_dir = save_model(shape, tmp / shape)
            singles = {}
            for parallel, compile_ in (mode.split(":") for mode in args.modes):
                if compile_ not in singles:  # one process: the parallel mode does not apply
                    singles[compile_] = run(model_dir, data, tmp / f"{shape}-1-{compile_}", shape, 1, args.nproc,
                                            parallel, compile_, args.steps, args.method)
                many = run(model_dir, data, tmp / f"{shape}-{args.nproc}-{parallel}-{compile_}", shape, args.nproc,
                           args.nproc, parallel, compile_, args.steps, args.method)
                one = singles[compile_]
                key = f"{shape} {args.method} {parallel} compile={compile_}"
                if "error" in one or "error" in many:
                    results[key] = {"error": one.get("error") or many.get("error")}
                    print(key, "ERROR", results[key]["error"][-600:], flush=True)
                    continue
                diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one["records"], many["records"])]
                t1, tn = tokens_per_s(one["records"], args.warmup), tokens_per_s(many["records"], args.warmup)
                results[key] = {"tokens_per_s_1": t1, f"tokens_per_s_{args.nproc}": tn, "scaling": tn / t1,
                                "peak_gib_1": one["peak_gib"], f"peak_gib_{args.nproc}": many["peak_gib"],
                                "max_rel_loss_diff": max(diffs), "wall_s_1": one["wall_s"],
                                f"wall_s_{args.nproc}": many["wall_s"]}
                print(key, json.dumps(results[key]), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
            if args.two_nodes:
                nodes = run_two_nodes(model_dir, data, tmp / f"{shape}-nodes", shape, args.steps)
                one = singles["off"]
                if "error" in nodes:
                    results[f"{shape} two nodes"] = nodes
                else:
                    results[f"{shape} two nodes"] = {"max_rel_loss_diff": max(
                        abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one["records"], nodes["records"])),
                        "steps": len(nodes["records"])}
                print(f"{shape} two nodes", json.dumps(results[f"{shape} two nodes"])[-800:], flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    n = args.nproc
    print(f"\n| run | 1 GPU tokens/s | {n} GPUs tokens/s | scaling | peak GiB 1 / {n} | max rel. loss diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        if "tokens_per_s_1" not in r:
            print(f"| {key} | {json.dumps(r)[:200]} | | | | |")
            continue
        if "error" in r:
            print(f"| {key} | error | | | | |")
            continue
        print(f"| {key} | {r['tokens_per_s_1']:,.0f} | {r[f'tokens_per_s_{n}']:,.0f} | {r['scaling']:.2f}x | "
              f"{r['peak_gib_1']:.1f} / {r[f'peak_gib_{n}']:.1f} | {r['max_rel_loss_diff']:.4f} |")


if __name__ == "__main__":
    main()
