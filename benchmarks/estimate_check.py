"""`loratune estimate` against reality on one GPU: the estimated peak memory against the measured one, and the
probe's time estimate against the run it predicts.

Run (on a CUDA machine; about 6 minutes on an H100, most of it compiling):
    python benchmarks/estimate_check.py --out benchmarks/results/estimate-check.json
    python benchmarks/estimate_check.py --memory-only --cases gpt2:lora gpt2:full

Models are random-init at their real shapes, trained on random-letter texts (log-normal lengths, median 180 tokens)
in packed 16 x 1024 rows, as throughput.py does. Memory: each case is one train() of 6 steps in this process; its
peak is torch.cuda.max_memory_allocated() over the run minus what was allocated before it, the same measure
`loratune train` reports. Time: `estimate --probe` (20 real steps) against the same config run for --steps steps,
both timed in-process from the call to its return (the import, about the same for both, is left out).

`--measured FROM.json` runs nothing: it takes the measured peaks of an earlier GPU run and puts this code's
estimates beside them (the estimate needs no GPU: it is computed from the model's config for a CUDA device), so a
change to the estimate can be checked on any machine against the same measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import cleanup, example_lengths, loratune_config, save_model, write_texts  # noqa: E402

from loratune.plan.estimate import data_summary, estimate, probe  # noqa: E402
from loratune.training.recipe import train  # noqa: E402

CASES = ["gpt2:lora", "gpt2:lora:compile", "gpt2:full", "gpt2:lora:checkpointing", "gpt2-medium:lora",
         "gpt2-medium:full", "smollm2-135m:lora", "smollm2-135m:lora:compile", "smollm2-135m:full",
         "smollm2-135m:lora:checkpointing"]


def case_config(models: dict, data: Path, out: Path, case: str, **train_kw):
    shape, method, *flags = case.split(":")
    if shape not in models:
        models[shape] = save_model(shape, out.parent / f"model-{shape}")
    kw = {"compile": "on" if "compile" in flags else "off", "gradient_checkpointing": "checkpointing" in flags,
          "report_to": [], **train_kw}
    cfg = loratune_config(models[shape], data, shape, out, **kw)
    return dataclasses.replace(cfg, method=method)


def memory_case(models: dict, data: Path, tmp: Path, case: str) -> dict:
    cfg = case_config(models, data, tmp / case.replace(":", "-"), case, max_steps=6)
    cleanup()
    before = torch.cuda.memory_allocated()
    train(cfg)
    measured = torch.cuda.max_memory_allocated() - before
    return compared(case, estimate(cfg, torch.device("cuda")), measured / 2**30)


def compared(case: str, e, measured_gib: float) -> dict:
    return {"case": case, "estimated_gib": e.peak / 2**30, "measured_gib": measured_gib,
            "error": e.peak / 2**30 / measured_gib - 1,
            "parts_gib": {k: getattr(e, k) / 2**30 for k in ("weights", "gradients", "optimizer", "activations", "loss")}}


def re_estimate(models: dict, data: Path, tmp: Path, measured: dict) -> dict:
    """This code's estimate for a case measured earlier (on a GPU that need not be here)."""
    cfg = case_config(models, data, tmp / measured["case"].replace(":", "-"), measured["case"], max_steps=6)
    return compared(measured["case"], estimate(cfg, torch.device("cuda")), measured["measured_gib"])


def time_case(models: dict, data: Path, tmp: Path, case: str, steps: int) -> dict:
    cfg = case_config(models, data, tmp / f"time-{case.replace(':', '-')}", case, max_steps=steps)
    summary = data_summary(cfg, packed=True)
    cleanup()
    predicted = probe(cfg, 20, summary, packed=True)
    cleanup()
    start = time.perf_counter()
    train(cfg)
    real = time.perf_counter() - start
    return {"case": case, "steps": steps, "estimated_s": predicted["estimate_s"], "measured_s": real,
            "error": predicted["estimate_s"] / real - 1, "probe_wall_s": predicted["probe_wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=CASES)
    parser.add_argument("--time-cases", nargs="*", default=["gpt2:lora", "smollm2-135m:lora"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--measured", help="a JSON of an earlier run: re-estimate its memory cases, run nothing")
    parser.add_argument("--out")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="estimate-check-"))
    data = tmp / "texts.jsonl"
    write_texts(data, example_lengths(6000))
    models: dict = {}
    if args.measured:
        earlier = json.loads(Path(args.measured).read_text())
        results = {"device": earlier["device"], "memory": [re_estimate(models, data, tmp, r) for r in earlier["memory"]],
                   "time": [], "measured": args.measured}
    else:
        results = {"device": torch.cuda.get_device_name(), "memory": [], "time": []}
    for case in [] if args.measured else args.cases:
        results["memory"].append(memory_case(models, data, tmp, case))
        print(json.dumps(results["memory"][-1]), flush=True)
    for case in [] if args.memory_only or args.measured else args.time_cases:
        results["time"].append(time_case(models, data, tmp, case, args.steps))
        print(json.dumps(results["time"][-1]), flush=True)
    print(f"\n{results['device']}, packed 16 x 1024 rows, bf16 autocast")
    print("| case | estimated peak GiB | measured peak GiB | error |\n|---|---:|---:|---:|")
    for r in results["memory"]:
        print(f"| {r['case']} | {r['estimated_gib']:.2f} | {r['measured_gib']:.2f} | {100 * r['error']:+.1f}% |")
    if results["time"]:
        print("\n| case | steps | estimated s (probe of 20 steps) | measured s | error |\n|---|---:|---:|---:|---:|")
        for r in results["time"]:
            print(f"| {r['case']} | {r['steps']} | {r['estimated_s']:.1f} | {r['measured_s']:.1f} | "
                  f"{100 * r['error']:+.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
