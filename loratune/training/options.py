"""The choices the recipe makes from the config: fast path, compilation, precision, schedule, optimizer groups."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}: '{value}' should be one of {', '.join(allowed)}")
    return value


def use_fast_path(tc: TrainConfig, device: torch.device) -> bool:
    fast = choice("train.fast", tc.fast, ("auto", "on", "off"))
    return fast == "on" or (fast == "auto" and device.type == "cuda")


# Compiling the step costs 1-2 minutes once, then makes each token cheaper. On an H100, SmolLM2-135M took 110 s to
# compile and then trained 16 x 1024 rows at 317k tokens/s against 124k uncompiled (both replayed as CUDA graphs):
# it pays back after about 22M tokens. Below this many token slots (rows x row length x steps), runs stay uncompiled.
COMPILE_MIN_TOKENS = 20_000_000


def keep_compile_caches(root: str = "~/.cache/loratune/compile") -> None:
    """Keep inductor's and Triton's caches (compiled graphs and kernels) under loratune's cache directory, unless the
    user placed them: PyTorch's default is a folder in /tmp, which a reboot or a fresh container empties, and a run
    that finds its graphs there skips most of its compilation."""
    for variable, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(variable, str(Path(root).expanduser() / folder))


def worth_compiling(tc: TrainConfig, token_slots: int) -> bool:
    mode = choice("train.compile", tc.compile, ("auto", "on", "off"))
    return mode == "on" or (mode == "auto" and token_slots >= COMPILE_MIN_TOKENS)


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). fp16 needs a grad scaler and a GPU.

    On the CPU, auto stays fp32 even where bf16 is native (AVX512-BF16, AMX): on a 2-core AVX512-BF16 CPU, bf16
    autocast trained the demo 1.0-1.4x faster, but the adapter then answered 42 of the 43 held-out chats right instead
    of 43 (BENCHMARKS.md). `train.precision: bf16` is there for those who take that trade."""
    precision = choice("train.precision", tc.precision, ("auto", "fp32", "bf16", "fp16"))
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine or linear decay to lr * min_lr_ratio, or constant."""
    schedule = choice("train.schedule", cfg.schedule, ("cosine", "linear", "constant"))
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]
        return decay if schedule == "constant" else cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: biases and norm scales (1-D) are left alone."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def total_steps(tc: TrainConfig, batches_per_epoch: int) -> int:
    if tc.max_steps is not None:
        return tc.max_steps
    return max(1, math.ceil(batches_per_epoch // tc.grad_accum * tc.num_epochs))
