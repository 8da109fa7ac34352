"""The training recipe: one explicit loop, readable top to bottom."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import check_run_dir, save_run
from .config import Config, TrainConfig
from .data import IGNORE, Example, collate, load_data
from .model import add_lora, load_base_model, load_tokenizer, unwrap_causal_lm

log = logging.getLogger("loratune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(spec)


def sum_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over trained positions, and their count.

    The LM head runs only on positions that have a label, a chunk at a time, so the full
    (batch x length x vocab) logits tensor is never built: prompt tokens cost no head FLOPs.
    """
    causal_lm = unwrap_causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        logits = head(hidden[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total, int(targets.numel())


def count_trained(examples: list[Example]) -> int:
    return sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def batch_order(n_examples: int, batch_size: int, seed: int):
    """Yield batches of example indices forever; each epoch is a fresh permutation fixed by seed + epoch."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n_examples, generator=g).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]
        epoch += 1


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = max(1, n_examples // (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.num_epochs))


def train(cfg: Config, overwrite: bool = False) -> tuple[Path, dict]:
    """Train a LoRA adapter as `cfg` says; return the run directory and the final metrics."""
    tc = cfg.train
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, overwrite)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    tok = load_tokenizer(cfg.model)
    train_set, held_out, report = load_data(cfg.data, tok, tc.seed)
    for line in report:
        log.info("data: %s", line)
    model = add_lora(load_base_model(cfg.model, device), cfg.lora)
    model.train()

    steps = total_steps(tc, len(train_set))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, steps))
    # bf16 autocast on GPU keeps LoRA weights and optimizer state in fp32; on CPU everything stays fp32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = batch_order(len(train_set), min(tc.batch_size, len(train_set)), tc.seed)

    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty run behind
    metrics_file = (run_dir / "metrics.jsonl").open("w")
    seen_tokens, start_time, loss_value = 0, time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        micro = [[train_set[i] for i in next(batches)] for _ in range(tc.grad_accum)]
        # Normalise by the trained tokens of the whole accumulated batch, so the update equals the
        # one a single big batch would give, however the tokens fall across micro-batches.
        n_trained = sum(count_trained(m) for m in micro)
        step_loss = 0.0
        for examples in micro:
            batch = {k: v.to(device) for k, v in collate(examples, tok.pad_token_id).items()}
            with autocast:
                nll, _ = sum_token_nll(model, batch)
            (nll / n_trained).backward()
            step_loss += nll.item()
            seen_tokens += int(batch["attention_mask"].sum())
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = step_loss / n_trained
        elapsed = time.perf_counter() - start_time
        lr = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen_tokens / elapsed:,.0f}")
        if (step + 1) % tc.log_every == 0 or step + 1 == steps:
            metrics_file.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr, "tokens": seen_tokens,
                                           "tokens_per_s": seen_tokens / elapsed, "elapsed_s": elapsed}) + "\n")
            metrics_file.flush()
    bar.close()
    metrics_file.close()

    final = {"steps": steps, "train_loss": loss_value, "tokens": seen_tokens,
             "train_seconds": time.perf_counter() - start_time, "held_out_examples": len(held_out)}
    save_run(model, tok, cfg, run_dir, final)
    log.info("saved adapter to %s (%.0f s, final loss %.4f)", run_dir, final["train_seconds"], loss_value)
    return run_dir, final
