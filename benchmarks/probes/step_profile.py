"""Where a training step's GPU time goes: loratune's own train() on the throughput benchmark's data and shapes, with
torch.profiler around a few steps after warm-up. Kernels are grouped (matmuls, attention, loss, LoRA-free
elementwise, optimizer, copies); the table gives ms per step and the share of the step, and the GPU's busy time
against the step's wall time says how much is host-bound.

    python benchmarks/probes/step_profile.py --shapes gpt2 smollm2-135m --out profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import cleanup, example_lengths, run_loratune, save_model, write_texts  # noqa: E402

import loratune.training.recipe as recipe  # noqa: E402

# First match wins: cuBLAS/CUTLASS gemms, then attention, then the loss's kernels (inductor names a fused kernel
# after the ops it holds), the optimizer, copies, and the rest (inductor's fused elementwise/reduction kernels).
GROUPS = [
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_|splitk|cublas|triton_tem_fused_(addmm|mm|bmm)"),
    ("attention", r"flex_attention|flash|fmha|attention|triton_tem_fused"),
    ("loss (log-softmax, NLL)", r"softmax|nll|cross_entropy|logsumexp"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|clip"),
    ("copies, fills", r"memcpy|memset|copy|fill|Memcpy|Memset"),
    ("other fused elementwise/reduction", r"."),
]


def group_of(name: str) -> str:
    return next(g for g, pattern in GROUPS if re.search(pattern, name, re.I))


def profile_train(model_dir: Path, data_file: Path, shape: str, start: int, count: int, **train_kw) -> dict:
    """Run train() and profile steps start..start+count (the profiler starts after a synchronize, so earlier steps'
    work is not counted)."""
    inner, seen, prof = recipe.train_step, [0], {}

    def profiled_step(*args, **kwargs):
        seen[0] += 1
        if seen[0] == start:
            torch.cuda.synchronize()
            prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                           torch.profiler.ProfilerActivity.CPU])
            prof["p"].__enter__()
            prof["t"] = time.perf_counter()
        out = inner(*args, **kwargs)
        if seen[0] == start + count - 1:
            torch.cuda.synchronize()
            prof["wall"] = time.perf_counter() - prof["t"]
            prof["p"].__exit__(None, None, None)
        return out

    recipe.train_step = profiled_step
    try:
        result = run_loratune(model_dir, data_file, shape, steps=start + count + 10, warmup=10, **train_kw)
    finally:
        recipe.train_step = inner
    kernels: collections.Counter = collections.Counter()
    for e in prof["p"].events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += e.device_time_total / 1000 / count  # us over `count` steps -> ms per step
    groups: collections.Counter = collections.Counter()
    for name, ms in kernels.items():
        groups[group_of(name)] += ms
    busy = sum(groups.values())
    result |= {"wall_ms_per_step": 1000 * prof["wall"] / count, "gpu_busy_ms_per_step": busy,
               "groups_ms": dict(groups.most_common()), "top_kernels_ms": dict(kernels.most_common(25))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "smollm2-135m"])
    parser.add_argument("--variants", nargs="+", default=["graphs"], help="graphs (the default path), eager-launch "
                        "(cuda_graphs=off: kernels launched one by one)")
    parser.add_argument("--start", type=int, default=30)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--out", default="step-profile.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data_file = tmp / "data.jsonl"
    write_texts(data_file, example_lengths(8000))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for shape in args.shapes:
        model_dir = save_model(shape, tmp / shape)
        for variant in args.variants:
            kw = {"cuda_graphs": "off"} if variant == "eager-launch" else {}
            cleanup()
            r = profile_train(model_dir, data_file, shape, args.start, args.count, **kw)
            results["runs"][f"{shape} {variant}"] = r
            print(f"\n{shape} {variant}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB, "
                  f"wall {r['wall_ms_per_step']:.1f} ms/step, GPU busy {r['gpu_busy_ms_per_step']:.1f} ms/step")
            for g, ms in r["groups_ms"].items():
                print(f"  {g:36s} {ms:7.2f} ms  {100 * ms / r['gpu_busy_ms_per_step']:5.1f}%")
            for k, ms in list(r["top_kernels_ms"].items())[:12]:
                print(f"    {ms:7.2f} ms  {k[:110]}")
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
