"""LoRA against full fine-tuning on the same data, in one table: trainable parameters, peak memory, time, held-out loss.

Run (CPU, embedded SmolLM2-135M-Instruct and the demo data, ~4 minutes on 2 cores):
    python benchmarks/lora_vs_full.py --steps 20
Any config and overrides work: python benchmarks/lora_vs_full.py my.yaml --steps 200 --train.lr=1e-4
Full fine-tuning usually wants a lower learning rate than LoRA: --full_lr sets it (default lr / 10).
Each method runs in its own process, so peak memory (resident memory on the CPU, allocated memory on the GPU) is its own.
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


def run(method: str, config: list[str], overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "loratune", "train", *config, *overrides, f"--method={method}",
           f"--output_dir={out}", "--train.report_to=[]"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        sys.exit(f"{method} run failed:\n{err[-3000:]}")
    final = json.loads((out / "final_metrics.json").read_text())
    history = json.loads((out / "eval_history.json").read_text())
    return {"method": method, "trainable": final["trainable_parameters"], "seconds": time.perf_counter() - start,
            "train_seconds": final["train_seconds"], "peak_rss_gib": usage.ru_maxrss / 2**20,
            "peak_gpu_gib": final["peak_gpu_gib"], "eval_loss": history[-1]["eval_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    parser.add_argument("--full_lr", type=float, default=None, help="full fine-tuning learning rate (default lr / 10)")
    parser.add_argument("--out", default="benchmarks/results/lora_vs_full.json")
    args, rest = parser.parse_known_args()
    common = [f"--train.max_steps={args.steps}", f"--train.eval_every={args.steps}", *rest]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, lr in (("lora", args.lr), ("full", args.full_lr or args.lr / 10)):
            rows.append({**run(method, [args.config] if args.config else [], common + [f"--train.lr={lr}"],
                               Path(tmp) / method), "lr": lr})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("| method | lr | trainable params | peak RSS GiB | peak GPU GiB | train s | held-out loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['peak_rss_gib']:.2f} | {gpu} | "
              f"{r['train_seconds']:.0f} | {r['eval_loss']:.4f} |")


if __name__ == "__main__":
    main()
