"""Probe: where a small job's time goes on a GPU. Random-init SmolLM2-135M shape, LoRA r=8 on q/k/v/o, 4,700 examples
of ~45 tokens packed into rows, 2 epochs (or max_steps): plain launches vs CUDA graphs vs compiled + CUDA graphs; then
greedy generation of 630 prompts x 60 tokens with the adapter separate or merged, in batches of 256 or 640.

Run (needs CUDA): python benchmarks/probes/small_steps.py --variants eager-4x256 graphs-4x256 --generation
Results of the H100 runs on 2026-11-23 (see BENCHMARKS.md for which code each measured):
benchmarks/results/h100-2026-11-23c-probe-step-and-generation.json and h100-2026-11-23c-probe-dense-mask-steps.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import save_model  # noqa: E402

from loratune.config import Config, DataConfig, DatasetConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from loratune.inference.generate import generate_batch  # noqa: E402
from loratune.inference.load import load  # noqa: E402
from loratune.training.recipe import train  # noqa: E402

# name: (rows, row length, train overrides)
VARIANTS = {
    "eager-4x256": (4, 256, dict(cuda_graphs="off", compile="off", max_steps=60)),
    "graphs-4x256": (4, 256, dict(cuda_graphs="on", compile="off")),
    "compiled-graphs-4x256": (4, 256, dict(cuda_graphs="on", compile="on")),
    "graphs-16x256": (16, 256, dict(cuda_graphs="on", compile="off")),
    "graphs-3x256": (3, 256, dict(cuda_graphs="on", compile="off")),
    "eager-3x256": (3, 256, dict(cuda_graphs="off", compile="off", max_steps=60)),
    "graphs-16x1024": (16, 1024, dict(cuda_graphs="on", compile="off", max_steps=40)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--generation", action="store_true", help="also time greedy generation")
    parser.add_argument("--out", default="small_steps.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = Path(tempfile.mkdtemp())
    model_dir = save_model("smollm2-135m", tmp / "model")
    rng = random.Random(0)
    lengths = [max(20, min(80, int(rng.gauss(45, 8)))) for _ in range(4700)]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "".join(rng.choices(string.ascii_lowercase, k=n - 1))}) + "\n"
                            for n in lengths))
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.variants:
        rows, row_len, overrides = VARIANTS[name]
        cfg = Config(model=ModelConfig(name=str(model_dir)),
                     lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                     data=DataConfig(datasets=[DatasetConfig(path=str(data), format="text")], max_length=row_len,
                                     packing=True, cache_dir=None),
                     train=TrainConfig(**{"batch_size": rows, "lr": 5e-4, "num_epochs": 2, "report_to": [],
                                          "log_every": 10, **overrides}),
                     output_dir=str(tmp / name))
        torch.cuda.synchronize()
        start = time.perf_counter()
        run_dir, final = train(cfg)
        torch.cuda.synchronize()
        log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        first, last = log[9], log[-1]  # the loss syncs every 10 steps, so elapsed_s is exact at those
        out[name] = {"wall_s": time.perf_counter() - start, "steps": final["steps"], "first10_s": first["elapsed_s"],
                     "ms_per_step_after10": 1000 * (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]),
                     "peak_gib": final["peak_gpu_gib"]}
        print(name, out[name], flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    if args.generation:
        prompts = [[rng.randrange(256) for _ in range(rng.randint(20, 28))] for _ in range(630)]
        for merge in (False, True):
            model, tok = load(tmp / args.variants[0], device="cuda", merge_adapter=merge)
            for batch_size in (256, 640):
                generate_batch(model, tok, prompts[:8], 4, batch_size=8)  # warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                generate_batch(model, tok, prompts, 60, batch_size=batch_size)
                torch.cuda.synchronize()
                out[f"generate merged={merge} batch={batch_size} s"] = time.perf_counter() - start
                print(f"generate merged={merge} batch={batch_size}", out[f"generate merged={merge} batch={batch_size} s"])
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
