"""Resume with another number of GPUs: 2 -> 1 -> 2 against an uninterrupted 2-GPU run, on real GPUs.

Run on a machine with 2 GPUs (about 2 minutes):
    python benchmarks/probes/resume_world.py --out resume-world.json

A: `loratune train --nproc 2`, 30 steps, a checkpoint every 10. B: A as a kill after step 10 leaves it, resumed in
one process (it goes on to the end, writing checkpoints 20 and 30). C: B as a kill after step 20 leaves it, resumed
with --nproc 2. C's losses and adapter are compared with A's. Random-init GPT-2 shape, LoRA r=8, packed 16 x 1024
rows, global batch 2 x 16 rows (one process accumulates two micro-batches), uncompiled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaling import write_config  # noqa: E402
from throughput import example_lengths, save_model, write_texts  # noqa: E402


def train(config: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", str(config), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])


def cut(run_dir: Path, dest: Path, at_step: int) -> Path:
    """What a kill after checkpoint `at_step` leaves (later checkpoints and the final files never written)."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > at_step:
            shutil.rmtree(ckpt)
    for name in ("adapter_model.safetensors", "adapter_config.json", "final_metrics.json"):
        (dest / name).unlink(missing_ok=True)
    return dest


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="resume-world-"))
    data = tmp / "data.jsonl"
    write_texts(data, example_lengths(5000))
    model = save_model("gpt2", tmp / "gpt2")
    kw = {"save_every": 10, "keep_checkpoints": 5}
    config_a = write_config(model, data, tmp / "a", "gpt2", 2, "ddp", "off", 30, **kw)
    train(config_a, "--nproc", "2")
    b = cut(tmp / "a", tmp / "b", 10)
    train(config_a, "--resume", str(b))  # one process: grad_accum 2 gives the same global batch
    c = cut(b, tmp / "c", 20)
    train(config_a, "--resume", str(c), "--nproc", "2")
    a_loss, c_loss = losses(tmp / "a"), losses(c)
    loss_diff = max(abs(a_loss[s] - c_loss[s]) / abs(a_loss[s]) for s in a_loss)
    a_w, c_w = load_file(tmp / "a" / "adapter_model.safetensors"), load_file(c / "adapter_model.safetensors")
    weight_diff = max(float((a_w[k].float() - c_w[k].float()).abs().max()) for k in a_w)
    scale = max(float(a_w[k].float().abs().max()) for k in a_w)
    result = {"steps": len(a_loss), "max_rel_loss_diff": loss_diff, "max_abs_adapter_diff": weight_diff,
              "max_abs_adapter_weight": scale, "device": torch.cuda.get_device_name()}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
