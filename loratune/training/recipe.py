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

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, TrainConfig, save_config
from ..data.batches import all_batches, epoch_batches, to_device_batch, token_counts
from ..data.examples import Example, load_data
from ..data.packing import pack_rows
from ..model.attention import use_packed_attention
from ..model.load import count_parameters, load_base_model, load_tokenizer, prepare_for_training, unwrap_causal_lm
from ..model.loss import SummedNLL, packed_nll
from .checkpoint import (
    RunDirError,
    check_run_dir,
    clear_run_dir,
    latest_checkpoint,
    load_training_state,
    load_weights,
    rng_state,
    save_checkpoint,
    save_run,
)
from .distributed import (
    Dist,
    any_rank,
    barrier,
    check_grad_accum,
    full_weights,
    gather_to_main,
    gradient_sync,
    inner,
    is_sharded,
    load_optimizer_state,
    my_share,
    optimizer_state,
    setup,
    sum_over_ranks,
    teardown,
    wrap,
)
from .graphs import GraphedMicroStep, graphs_blocker
from .periodic_eval import generation_metrics, held_out_losses
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


# Compiling the step costs 1-2 minutes once, then makes each token cheaper. On an H100, SmolLM2-135M took 110 s to
# compile and then trained 16 x 1024 rows at 317k tokens/s against 124k uncompiled (both replayed as CUDA graphs):
# it pays back after about 22M tokens. Below this many token slots (rows x row length x steps), runs stay uncompiled.
COMPILE_MIN_TOKENS = 20_000_000


def worth_compiling(tc: TrainConfig, token_slots: int) -> bool:
    mode = _choice("train.compile", tc.compile, ("auto", "on", "off"))
    return mode == "on" or (mode == "auto" and token_slots >= COMPILE_MIN_TOKENS)


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). fp16 needs a grad scaler and a GPU."""
    precision = _choice("train.precision", tc.precision, ("auto", "fp32", "bf16", "fp16"))
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def total_steps(tc: TrainConfig, batches_per_epoch: int) -> int:
    if tc.max_steps is not None:
        return tc.max_steps
    return max(1, math.ceil(batches_per_epoch // tc.grad_accum * tc.num_epochs))


def _under(context, fn, *args):
    with context:
        return fn(*args)


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
    Under torchrun every process calls this; see loratune.distributed for how they share the work.
    """
    tc = cfg.train
    d = setup(tc.device)
    check_grad_accum(tc.grad_accum, d)
    if not d.main:
        log.setLevel(logging.WARNING)  # one process reports; the others speak only of trouble
    parallel = _choice("train.parallel", tc.parallel, ("ddp", "fsdp"))
    if d.enabled and parallel == "fsdp" and tc.generate_every_evals:
        raise ValueError("train.generate_every_evals needs the whole model on rank 0; set it to 0 with train.parallel=fsdp")
    if not tc.best_metric.startswith("eval_loss"):
        raise ValueError(f"train.best_metric: '{tc.best_metric}' should be eval_loss or eval_loss/DATASET")
    run_dir = Path(cfg.output_dir)
    if d.main:
        latest_checkpoint(run_dir)  # clears what an interrupted checkpoint write left, once, before anyone reads
    barrier(d)
    checkpoint = latest_checkpoint(run_dir)
    resuming = resume if resume is not None else _choice("train.resume", tc.resume, ("never", "auto")) == "auto"
    if resume and checkpoint is None:
        raise RunDirError(f"--resume {run_dir}: no finished checkpoint there to resume from")
    resuming = resuming and checkpoint is not None
    if not resuming:
        check_run_dir(run_dir, overwrite)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    fast = use_fast_path(tc, device)
    packed = fast or cfg.data.packing
    dtype = autocast_dtype(tc, device)
    # No cast cache: a CUDA graph must recompute its casts at every replay (weights change between steps).
    autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    tok = load_tokenizer(cfg.model)
    train_set, held_out, report = load_data(cfg.data, tok, tc.seed)
    for line in report:
        log.info("data: %s", line)
    model = prepare_for_training(load_base_model(cfg.model, device), cfg.method, cfg.lora)
    if resuming:
        load_weights(checkpoint, model)  # before DDP or FSDP wraps the model
    if d.enabled:
        torch.manual_seed(tc.seed + d.rank)  # same initial weights everywhere, but each rank its own dropout masks
    if tc.gradient_checkpointing:
        # Non-reentrant checkpointing gives the LoRA weights their gradients even though the frozen inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    causal_lm = unwrap_causal_lm(model)
    if packed:
        use_packed_attention(model)
    row_len = cfg.data.max_length if packed else None
    steps = total_steps(tc, len(epoch_batches(train_set, tc.batch_size, row_len, tc.seed, 0)))
    slots = steps * tc.batch_size * tc.grad_accum * (row_len or 0)
    compiled = worth_compiling(tc, slots) and fast and device.type == "cuda"
    loss_fn = torch.compile(packed_nll, dynamic=False) if compiled else packed_nll  # one row shape: one compilation
    nll_module = SummedNLL(model, loss_fn, packed)
    if d.enabled:
        nll_module = wrap(nll_module, causal_lm, parallel, device)
    sharded = is_sharded(nll_module)
    graphs = _choice("train.cuda_graphs", tc.cuda_graphs, ("auto", "on", "off"))
    blocker = graphs_blocker(device, packed, d.world, scaler is not None, tc.gradient_checkpointing)
    if graphs == "on" and blocker:
        raise ValueError(f"train.cuda_graphs=on: {blocker}")

    params = [p for p in model.parameters() if p.requires_grad]
    graphed = None if blocker or graphs == "off" else GraphedMicroStep(
        lambda batch: _under(autocast, nll_module, batch), params, fallback=graphs == "auto")
    log.info("path: %s%s%s", "packed, compiled" if compiled else "packed" if packed else "plain (padded batches)",
             ", CUDA graphs" if graphed else "", f", {d.world} processes" if d.enabled else "")
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, steps))

    if d.main:
        if overwrite and not resuming:
            clear_run_dir(run_dir)  # only now that loading worked: a failed start leaves the old run as it was
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty run behind
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))  # the realised mix, for `loratune report`
    barrier(d)
    state = {"batches": 0, "evals": 0, "best": None, "best_checkpoint": None, "evals_without_improvement": 0}
    if resuming:
        state.update(load_training_state(
            checkpoint, lambda saved: load_optimizer_state(nll_module, optimizer, saved, str(checkpoint)),
            scheduler, scaler, rank=d.rank))
        log.info("resumed from %s (step %d)", checkpoint, state["step"])
    start = state.get("step", 0)
    tracker = Tracker(run_dir, tc.report_to, dataclasses.asdict(cfg), resume_step=start) if d.main else None
    batches = all_batches(train_set, tc.batch_size, row_len, tc.seed, skip=state["batches"])

    def nll_of(examples: list[Example]) -> tuple[float, int]:
        """Held-out NLL through the training path; packed batches keep the training shape (no recompile)."""
        if packed:
            rows = pack_rows(examples, list(range(len(examples))), row_len)
            groups = [[[examples[i] for i in row] for row in rows[f : f + tc.batch_size]]
                      for f in range(0, len(rows), tc.batch_size)]
        else:
            groups = [examples[f : f + tc.batch_size] for f in range(0, len(examples), tc.batch_size)]
        total, count = 0.0, 0
        for group in groups:
            padded = group + [[]] * (tc.batch_size - len(group)) if packed else group
            batch = to_device_batch(padded, cfg.data, tok.pad_token_id, device, packed)
            total, count = total + inner(nll_module)(batch).item(), count + token_counts(group, packed)[0]
        return total, count

    def write_checkpoint(step: int) -> None:
        rngs = gather_to_main(rng_state(), d)  # every rank's RNG, so every rank resumes its own dropout stream
        weights, optim = full_weights(model) if sharded else None, optimizer_state(nll_module, optimizer)
        if d.main:
            save_checkpoint(run_dir, step, model, optim, scheduler, scaler,
                            {k: v for k, v in state.items() if k != "step"}, tc.keep_checkpoints,
                            protect=state["best_checkpoint"], rngs=rngs, weights=weights)
        barrier(d)

    gen_sample = [e for e in held_out if e.prompt_len > 0][: tc.generate_samples]
    pending: list[tuple[int, torch.Tensor, int, float, int]] = []  # losses stay on the device until a sync
    tokens_at_start = state.setdefault("tokens", 0)
    seen_tokens, start_time, loss_value, lr, stop_reason = tokens_at_start, time.perf_counter(), float("nan"), tc.lr, None

    def sync() -> None:
        """Bring pending losses to the host (summed over ranks): log them, and stop on NaN/inf before anything
        is checkpointed. Every rank calls it at the same steps."""
        nonlocal loss_value
        if not pending:
            return
        elapsed = time.perf_counter() - start_time
        totals = sum_over_ranks(torch.stack([p[1] for p in pending]), d).tolist()
        for (n_step, _, n_tok, step_lr, tokens), total in zip(pending, totals):
            loss_value = total / n_tok
            if not math.isfinite(loss_value):
                kept = latest_checkpoint(run_dir)
                raise TrainingError(f"loss is {loss_value} at step {n_step}; stopping. Last good checkpoint: "
                                    f"{kept or 'none written yet'}. Try a lower train.lr, or precision bf16/fp32")
            if tracker:
                tracker.log_train({"step": n_step, "loss": loss_value, "lr": step_lr, "tokens": tokens,
                                   "tokens_per_s": (seen_tokens - tokens_at_start) / elapsed, "elapsed_s": elapsed})
        if tracker:
            tracker.flush()
        pending.clear()

    with StopRequest() as stop:
        bar = tqdm(range(start, steps), desc="train", unit="step", dynamic_ncols=True, initial=start, total=steps,
                   disable=not d.main)
        for step in bar:
            # Every rank draws the whole step from the same stream and trains on its share of the micro-batches.
            micro = [next(batches) for _ in range(tc.grad_accum)]
            counts = [token_counts(items, packed) for items in micro]
            # Normalise by the trained tokens of the whole step (every micro-batch of every rank), so the update
            # equals the one a single big batch would give, however the tokens fall across micro-batches.
            n_trained = max(sum(trained for trained, _ in counts), 1)
            seen_tokens += sum(real for _, real in counts)
            mine = my_share(micro, d)
            step_nll = torch.zeros((), device=device)
            for i, items in enumerate(mine):
                batch = to_device_batch(items, cfg.data, tok.pad_token_id, device, packed)
                if graphed:
                    step_nll += graphed(batch, 1 / n_trained)
                    continue
                # Gradients are averaged over ranks once, after this rank's last micro-batch; hence x world.
                with gradient_sync(nll_module, on=i == len(mine) - 1):
                    with autocast:
                        nll = nll_module(batch)
                    loss = nll * d.world / n_trained
                    (scaler.scale(loss) if scaler else loss).backward()
                step_nll += nll.detach()
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
            optimizer.zero_grad(set_to_none=graphed is None)  # a CUDA graph adds into the same .grad tensors
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
                # FSDP gathers weights in every forward, so there each rank scores all of it (same number of calls).
                metrics = held_out_losses(model, held_out, nll_of, autocast, Dist() if sharded else d, device)
                state["evals"] += 1
                if tc.generate_every_evals and state["evals"] % tc.generate_every_evals == 0 and gen_sample and d.main:
                    metrics.update(generation_metrics(model, tok, gen_sample, cfg.eval.max_new_tokens, packed, autocast))
                if tracker:
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
            if any_rank(stop.signal is not None, d):  # torchrun may deliver Ctrl-C to some ranks only
                stop_reason = f"{stop.signal or 'a stop signal'} received"
            if checkpoint_now or stop_reason:
                sync()
                write_checkpoint(done)
            if stop_reason:
                break
        sync()
        bar.close()
    if tracker:
        tracker.close()

    final = {"method": cfg.method, "trainable_parameters": count_parameters(model)[0],
             "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
             "steps": done if steps > start else start, "train_loss": loss_value, "tokens": seen_tokens - tokens_at_start,
             "train_seconds": time.perf_counter() - start_time, "held_out_examples": len(held_out),
             "best": state["best"], "best_checkpoint": state["best_checkpoint"], "stopped": stop_reason,
             "processes": d.world}
    if stop_reason and stop_reason.endswith("received"):
        log.warning("%s at step %d: checkpoint written. Resume with:  loratune train --resume %s",
                    stop_reason, final["steps"], run_dir)
        teardown(d)
        return run_dir, {**final, "interrupted": True}
    weights = full_weights(model) if sharded else None
    if d.main:
        save_run(model, tok, cfg, run_dir, final, state_dict=weights)
    barrier(d)
    teardown(d)
    log.info("saved adapter to %s (%.0f s, final loss %.4f)%s", run_dir, final["train_seconds"], loss_value,
             f"; {stop_reason}" if stop_reason else "")
    return run_dir, final
