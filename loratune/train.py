"""The training recipe: one explicit loop, readable top to bottom."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import check_run_dir, save_run
from .config import Config, DataConfig, TrainConfig
from .data import IGNORE, Example, collate, load_data
from .fast import collate_packed, pack_rows, packed_nll, use_packed_attention
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


def use_fast_path(tc: TrainConfig, device: torch.device) -> bool:
    if tc.fast not in ("auto", "on", "off"):
        raise ValueError(f"train.fast: '{tc.fast}' should be auto, on or off")
    return tc.fast == "on" or (tc.fast == "auto" and device.type == "cuda")


def sum_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over trained positions of a padded batch, and their count.

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


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def epoch_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int, epoch: int) -> list:
    """One epoch's batches, fixed by seed + epoch: lists of examples, or with packing lists of rows of examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if row_len is None:
        items = [examples[i] for i in order]
    else:
        items = [[examples[i] for i in row] for row in pack_rows(examples, order, row_len)]
    batch_size = min(batch_size, len(items))
    return [items[s : s + batch_size] for s in range(0, len(items) - batch_size + 1, batch_size)]


def all_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int) -> Iterator[list]:
    epoch = 0
    while True:
        yield from epoch_batches(examples, batch_size, row_len, seed, epoch)
        epoch += 1


def total_steps(tc: TrainConfig, batches_per_epoch: int) -> int:
    if tc.max_steps is not None:
        return tc.max_steps
    return max(1, math.ceil(batches_per_epoch // tc.grad_accum * tc.num_epochs))


def to_device_batch(items: list, data: DataConfig, pad_id: int, device: torch.device, packed: bool) -> tuple[dict, int, int]:
    """Collate on the CPU and copy over; returns (batch, trained tokens, real tokens), counted on the CPU so
    that the step needs no host sync."""
    if packed:
        batch = collate_packed(items, data.max_length, pad_id)
        n_trained, n_real = int((batch["targets"] != IGNORE).sum()), int((batch["doc_ids"] >= 0).sum())
    else:
        batch = collate(items, pad_id)
        n_trained, n_real = int((batch["labels"][:, 1:] != IGNORE).sum()), int(batch["attention_mask"].sum())
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}, n_trained, n_real


def train(cfg: Config, overwrite: bool = False) -> tuple[Path, dict]:
    """Train a LoRA adapter as `cfg` says; return the run directory and the final metrics."""
    tc = cfg.train
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, overwrite)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    fast = use_fast_path(tc, device)
    packed = fast or cfg.data.packing
    tok = load_tokenizer(cfg.model)
    train_set, held_out, report = load_data(cfg.data, tok, tc.seed)
    for line in report:
        log.info("data: %s", line)
    model = add_lora(load_base_model(cfg.model, device), cfg.lora)
    model.train()
    causal_lm = unwrap_causal_lm(model)
    backbone, head = getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()
    if packed:
        use_packed_attention(model)
    loss_fn = packed_nll
    if fast and device.type == "cuda":
        loss_fn = torch.compile(packed_nll, dynamic=False)  # packed rows have one shape: one compilation
    log.info("path: %s", "fast (packed, fused loss, compiled)" if fast else "packed" if packed else "plain (padded batches)")

    row_len = cfg.data.max_length if packed else None
    steps = total_steps(tc, len(epoch_batches(train_set, tc.batch_size, row_len, tc.seed, 0)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, steps))
    # bf16 autocast on GPU keeps LoRA weights and optimizer state in fp32; on CPU everything stays fp32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = all_batches(train_set, tc.batch_size, row_len, tc.seed)

    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty run behind
    metrics_file = (run_dir / "metrics.jsonl").open("w")
    pending: list[tuple[int, torch.Tensor, int, float]] = []  # losses stay on the device until the next sync
    seen_tokens, start_time, loss_value = 0, time.perf_counter(), float("nan")
    bar = tqdm(range(steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        micro = [to_device_batch(next(batches), cfg.data, tok.pad_token_id, device, packed) for _ in range(tc.grad_accum)]
        # Normalise by the trained tokens of the whole accumulated batch, so the update equals the
        # one a single big batch would give, however the tokens fall across micro-batches.
        n_trained = sum(n for _, n, _ in micro)
        step_nll = torch.zeros((), device=device)
        for batch, _, n_real in micro:
            with autocast:
                nll = loss_fn(backbone, head, batch) if packed else sum_token_nll(model, batch)[0]
            (nll / n_trained).backward()
            step_nll += nll.detach()
            seen_tokens += n_real
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append((step + 1, step_nll, n_trained, scheduler.get_last_lr()[0]))

        # A sync costs nothing on the CPU, so there the bar moves every step; on the GPU it would stall the queue.
        if len(pending) >= tc.log_every or step + 1 == steps or device.type == "cpu":
            elapsed = time.perf_counter() - start_time
            losses = torch.stack([p[1] for p in pending]).tolist()  # the one host sync per log interval
            for (n_step, _, n_tok, lr), total in zip(pending, losses):
                loss_value = total / n_tok
                metrics_file.write(json.dumps({"step": n_step, "loss": loss_value, "lr": lr, "tokens": seen_tokens,
                                               "tokens_per_s": seen_tokens / elapsed, "elapsed_s": elapsed}) + "\n")
            metrics_file.flush()
            pending.clear()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen_tokens / elapsed:,.0f}")
    bar.close()
    metrics_file.close()

    final = {"steps": steps, "train_loss": loss_value, "tokens": seen_tokens,
             "train_seconds": time.perf_counter() - start_time, "held_out_examples": len(held_out)}
    save_run(model, tok, cfg, run_dir, final)
    log.info("saved adapter to %s (%.0f s, final loss %.4f)", run_dir, final["train_seconds"], loss_value)
    return run_dir, final
