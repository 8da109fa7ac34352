"""The training recipe: one explicit loop, readable top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (RunDirError, check_run_dir, clear_run_dir, latest_checkpoint, load_checkpoint,
                         save_checkpoint, save_run)
from .config import Config, DataConfig, TrainConfig, save_config
from .data import IGNORE, Example, collate, load_data
from .fast import collate_packed, pack_rows, packed_nll, use_packed_attention
from .model import count_parameters, load_base_model, load_tokenizer, prepare_for_training, unwrap_causal_lm
from .tracking import Tracker

log = logging.getLogger("loratune")


class TrainingError(RuntimeError):
    """Training can't go on (e.g. the loss became NaN); the message says where and what was kept."""


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


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}: '{value}' should be one of {', '.join(allowed)}")
    return value


def use_fast_path(tc: TrainConfig, device: torch.device) -> bool:
    fast = _choice("train.fast", tc.fast, ("auto", "on", "off"))
    return fast == "on" or (fast == "auto" and device.type == "cuda")


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). fp16 needs a grad scaler and a GPU."""
    precision = _choice("train.precision", tc.precision, ("auto", "fp32", "bf16", "fp16"))
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
    """Linear warmup, then cosine or linear decay to lr * min_lr_ratio, or constant."""
    schedule = _choice("train.schedule", cfg.schedule, ("cosine", "linear", "constant"))
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


def epoch_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int, epoch: int) -> list:
    """One epoch's batches, fixed by seed + epoch: lists of examples, or with packing lists of rows of examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if row_len is None:
        items = [examples[i] for i in order]
    else:
        items = [[examples[i] for i in row] for row in pack_rows(examples, order, row_len)]
    batch_size = min(batch_size, len(items))
    return [items[s : s + batch_size] for s in range(0, len(items) - batch_size + 1, batch_size)]


def all_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int, skip: int = 0) -> Iterator[list]:
    """Every batch in order, forever, starting after the first `skip` (the data position of a resumed run)."""
    epoch = 0
    while True:
        batches = epoch_batches(examples, batch_size, row_len, seed, epoch)
        if skip >= len(batches):
            skip -= len(batches)
        else:
            yield from batches[skip:]
            skip = 0
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


@torch.no_grad()
def held_out_losses(model: torch.nn.Module, held_out: list[Example], nll_of, autocast) -> dict[str, float]:
    """Mean held-out loss (nats per trained token), overall and per dataset; nll_of(examples) -> (sum, count)."""
    model.eval()
    by_dataset: dict[str, list[Example]] = {}
    for e in held_out:
        by_dataset.setdefault(e.record.get("dataset", "data"), []).append(e)
    with autocast:
        sums = {name: nll_of(group) for name, group in by_dataset.items()}
    model.train()
    out = {"eval_loss": sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)}
    if len(sums) > 1:
        out.update({f"eval_loss/{name}": t / max(n, 1) for name, (t, n) in sums.items()})
    return out


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, tok, sample: list[Example], max_new_tokens: int, packed: bool,
                       autocast) -> dict[str, float]:
    """Greedy answers for a fixed held-out sample, scored like `loratune eval` (keys prefixed gen/)."""
    from .evaluate import score_generations
    from .fast import ATTENTION_NAME
    from .infer import generate_batch

    causal_lm = unwrap_causal_lm(model)
    model.eval()
    if packed:  # generation pads and caches; it needs the model's ordinary attention
        causal_lm.set_attn_implementation("sdpa")
    try:
        with autocast:
            predictions = generate_batch(model, tok, [e.input_ids[: e.prompt_len] for e in sample], max_new_tokens,
                                         batch_size=len(sample))
    finally:
        if packed:
            causal_lm.set_attn_implementation(ATTENTION_NAME)
        model.train()
    return {f"gen/{k}": v for k, v in score_generations(sample, predictions, tok).items()}


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, writes a checkpoint and returns."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, overwrite: bool = False, resume: bool | None = None) -> tuple[Path, dict]:
    """Train a LoRA adapter as `cfg` says; return the run directory and the final metrics.

    `resume=True` continues output_dir's newest checkpoint (an error if there is none); None follows train.resume.
    """
    tc = cfg.train
    run_dir = Path(cfg.output_dir)
    checkpoint = latest_checkpoint(run_dir)
    resuming = resume if resume is not None else _choice("train.resume", tc.resume, ("never", "auto")) == "auto"
    if resume and checkpoint is None:
        raise RunDirError(f"--resume {run_dir}: no finished checkpoint there to resume from")
    resuming = resuming and checkpoint is not None
    if not resuming:
        check_run_dir(run_dir, overwrite)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    fast = use_fast_path(tc, device)
    packed = fast or cfg.data.packing
    dtype = autocast_dtype(tc, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    tok = load_tokenizer(cfg.model)
    train_set, held_out, report = load_data(cfg.data, tok, tc.seed)
    for line in report:
        log.info("data: %s", line)
    model = prepare_for_training(load_base_model(cfg.model, device), cfg.method, cfg.lora)
    if tc.gradient_checkpointing:
        # Non-reentrant checkpointing gives the LoRA weights their gradients even though the frozen inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    causal_lm = unwrap_causal_lm(model)
    backbone, head = getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()
    if packed:
        use_packed_attention(model)
    loss_fn = packed_nll
    if fast and device.type == "cuda":
        loss_fn = torch.compile(packed_nll, dynamic=False)  # packed rows have one shape: one compilation
    log.info("path: %s", "fast (packed, compiled)" if fast else "packed" if packed else "plain (padded batches)")

    row_len = cfg.data.max_length if packed else None
    steps = total_steps(tc, len(epoch_batches(train_set, tc.batch_size, row_len, tc.seed, 0)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, steps))

    if overwrite and not resuming:
        clear_run_dir(run_dir)  # only now that loading worked: a failed start leaves the old run as it was
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty run behind
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))  # the realised mix, for `loratune report`
    state = {"batches": 0, "evals": 0, "best": None, "best_checkpoint": None, "evals_without_improvement": 0}
    if resuming:
        state.update(load_checkpoint(checkpoint, model, optimizer, scheduler, scaler))
        log.info("resumed from %s (step %d)", checkpoint, state["step"])
    start = state.get("step", 0)
    tracker = Tracker(run_dir, tc.report_to, dataclasses.asdict(cfg), resume_step=start)
    batches = all_batches(train_set, tc.batch_size, row_len, tc.seed, skip=state["batches"])

    def nll_of(examples: list[Example]) -> tuple[float, int]:
        """Held-out NLL through the same path as training; packed batches keep the training shape (no recompile)."""
        if not packed:
            from .evaluate import nll_and_count

            return nll_and_count(model, examples, tok.pad_token_id)
        rows = pack_rows(examples, list(range(len(examples))), row_len)
        total, count = 0.0, 0
        for first in range(0, len(rows), tc.batch_size):
            group = [[examples[i] for i in row] for row in rows[first : first + tc.batch_size]]
            batch, n, _ = to_device_batch(group + [[]] * (tc.batch_size - len(group)), cfg.data, tok.pad_token_id, device, True)
            total, count = total + loss_fn(backbone, head, batch).item(), count + n
        return total, count

    gen_sample = [e for e in held_out if e.prompt_len > 0][: tc.generate_samples]
    pending: list[tuple[int, torch.Tensor, int, float, int]] = []  # losses stay on the device until a sync
    tokens_at_start = state.setdefault("tokens", 0)
    seen_tokens, start_time, loss_value, lr, stop_reason = tokens_at_start, time.perf_counter(), float("nan"), tc.lr, None

    def sync() -> None:
        """Bring pending losses to the host: log them, and stop on NaN/inf before anything is checkpointed."""
        nonlocal loss_value
        if not pending:
            return
        elapsed = time.perf_counter() - start_time
        for (n_step, _, n_tok, step_lr, tokens), total in zip(pending, torch.stack([p[1] for p in pending]).tolist()):
            loss_value = total / n_tok
            if not math.isfinite(loss_value):
                kept = latest_checkpoint(run_dir)
                raise TrainingError(f"loss is {loss_value} at step {n_step}; stopping. Last good checkpoint: "
                                    f"{kept or 'none written yet'}. Try a lower train.lr, or precision bf16/fp32")
            tracker.log_train({"step": n_step, "loss": loss_value, "lr": step_lr, "tokens": tokens,
                               "tokens_per_s": (seen_tokens - tokens_at_start) / elapsed, "elapsed_s": elapsed})
        tracker.flush()
        pending.clear()

    with StopRequest() as stop:
        bar = tqdm(range(start, steps), desc="train", unit="step", dynamic_ncols=True, initial=start, total=steps)
        for step in bar:
            micro = [to_device_batch(next(batches), cfg.data, tok.pad_token_id, device, packed) for _ in range(tc.grad_accum)]
            # Normalise by the trained tokens of the whole accumulated batch, so the update equals the
            # one a single big batch would give, however the tokens fall across micro-batches.
            n_trained = sum(n for _, n, _ in micro)
            step_nll = torch.zeros((), device=device)
            for batch, _, n_real in micro:
                with autocast:
                    nll = loss_fn(backbone, head, batch) if packed else sum_token_nll(model, batch)[0]
                loss = nll / n_trained
                (scaler.scale(loss) if scaler else loss).backward()
                step_nll += nll.detach()
                seen_tokens += n_real
            if scaler:
                scaler.unscale_(optimizer)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["batches"] += tc.grad_accum
            state["tokens"] = seen_tokens
            done = step + 1
            lr = scheduler.get_last_lr()[0]
            pending.append((done, step_nll, n_trained, lr, seen_tokens))

            # A sync costs nothing on the CPU, so there the bar moves every step; on the GPU it would stall the queue.
            if len(pending) >= tc.log_every or device.type == "cpu":
                sync()
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{(seen_tokens - tokens_at_start) / (time.perf_counter() - start_time):,.0f}")
            checkpoint_now = done == steps or (tc.save_every and done % tc.save_every == 0)
            if tc.eval_every and (done % tc.eval_every == 0 or done == steps) and held_out:
                sync()
                metrics = held_out_losses(model, held_out, nll_of, autocast)
                state["evals"] += 1
                if tc.generate_every_evals and state["evals"] % tc.generate_every_evals == 0 and gen_sample:
                    metrics.update(generation_metrics(model, tok, gen_sample, cfg.eval.max_new_tokens, packed, autocast))
                tracker.log_eval(done, metrics)
                log.info("step %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if tc.best_metric not in metrics:
                    raise ValueError(f"train.best_metric: '{tc.best_metric}' is not among {sorted(metrics)}")
                if state["best"] is None or metrics[tc.best_metric] < state["best"] - tc.early_stopping_min_delta:
                    state.update(best=metrics[tc.best_metric], best_checkpoint=f"step-{done:06d}",
                                 evals_without_improvement=0)
                    checkpoint_now = True  # the best is always kept
                else:
                    state["evals_without_improvement"] += 1
                    if tc.early_stopping_patience and state["evals_without_improvement"] >= tc.early_stopping_patience:
                        stop_reason = f"early stopping: {tc.best_metric} has not improved for {tc.early_stopping_patience} evals"
            if stop.signal:
                stop_reason = f"{stop.signal} received"
            if checkpoint_now or stop_reason:
                sync()
                save_checkpoint(run_dir, done, model, optimizer, scheduler, scaler,
                                {k: v for k, v in state.items() if k != "step"}, tc.keep_checkpoints,
                                protect=state["best_checkpoint"])
            if stop_reason:
                break
        sync()
        bar.close()
    tracker.close()

    final = {"method": cfg.method, "trainable_parameters": count_parameters(model)[0],
             "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
             "steps": done if steps > start else start, "train_loss": loss_value, "tokens": seen_tokens - tokens_at_start,
             "train_seconds": time.perf_counter() - start_time, "held_out_examples": len(held_out),
             "best": state["best"], "best_checkpoint": state["best_checkpoint"], "stopped": stop_reason}
    if stop_reason and stop_reason.endswith("received"):
        log.warning("%s at step %d: checkpoint written. Resume with:  loratune train --resume %s",
                    stop_reason, final["steps"], run_dir)
        return run_dir, {**final, "interrupted": True}
    save_run(model, tok, cfg, run_dir, final)
    log.info("saved adapter to %s (%.0f s, final loss %.4f)%s", run_dir, final["train_seconds"], loss_value,
             f"; {stop_reason}" if stop_reason else "")
    return run_dir, final
