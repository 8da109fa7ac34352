"""The training recipe. `train()` reads top to bottom as the phases of a run; each phase is a plain function
below it. What the phases share lives in small dataclasses in training/state.py: `Run` (where and how the run
happens), `Parts` (the model side of the step) and `Progress` (what the loop has done so far)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from ..config import Config, load_config, save_config, validate
from ..data.batches import all_batches, epoch_batches, to_device_batch, token_counts
from ..data.examples import Example, load_data
from ..device import pick_device
from ..files import atomic_write
from ..logs import show_logs
from ..model.attention import use_packed_attention
from ..model.load import (
    count_parameters,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    prepare_for_training,
    unwrap_causal_lm,
    use_chat_template,
)
from ..model.loss import SummedNLL, packed_nll
from ..timing import phases
from . import distributed as dist
from . import rundir
from .checkpoint import (
    converted_init,
    latest_checkpoint,
    load_training_state,
    load_weights,
    resume_point,
    rng_state,
    save_checkpoint,
    save_initial_adapter,
    save_run,
)
from .graphs import GraphedMicroStep, graphs_blocker
from .options import (
    autocast_dtype,
    choice,
    keep_compile_caches,
    lr_lambda,
    param_groups,
    seed_everything,
    total_steps,
    use_fast_path,
    worth_compiling,
)
from .periodic_eval import periodic_eval
from .state import Parts, Progress, Run, StopRequest, TrainingError
from .tracking import Tracker

log = logging.getLogger("loratune")


def train(cfg: Config | dict | str | Path, overwrite: bool = False, resume: bool | None = None,
          protect: Iterable[str | Path] = (), on_eval: Optional[Callable[[int, dict], Optional[str]]] = None
          ) -> tuple[Path, dict]:
    """Train a LoRA adapter as `cfg` says (a Config, a dict of its keys, or a YAML file); return the run directory
    and the final metrics.

    `resume=True` continues output_dir's newest checkpoint; None follows train.resume. `protect`: paths this run
    reads (the config file); --overwrite never replaces a directory that holds them, nor one that holds the data.
    Under torchrun every process calls this; see loratune.training.distributed for how they share the work.
    `on_eval(step, metrics)` is called after each periodic eval; a string it returns stops the run there as early
    stopping does (the run is saved whole, the string is its final `stopped`): how a sweep prunes a poor trial.
    """
    show_logs()
    if not isinstance(cfg, Config):
        protect = [*protect, cfg] if isinstance(cfg, (str, Path)) else protect
        cfg = load_config(cfg)
    run = open_run(cfg, overwrite, resume, protect)
    run.on_eval = on_eval
    with phases("data"):
        tok = load_tokenizer(cfg.model)
        use_chat_template(tok, cfg.data.chat_template)
        train_set, held_out, report = load_data(cfg.data, tok, cfg.train.seed)
    for line in report:
        log.info("data: %s", line)
    row_len = cfg.data.max_length if run.packed else None
    run.steps = total_steps(cfg.train, len(epoch_batches(train_set, cfg.train.batch_size, row_len, cfg.train.seed, 0)))
    finished = already_finished(run)
    if finished is not None:
        return run.dir, finished
    parts = build_parts(run, train_set)
    aside = start_writing(run, report, parts)
    progress = restore(run, parts)
    tracker = Tracker(run.dir, cfg.train.report_to, dataclasses.asdict(cfg), resume_step=progress.step) \
        if run.d.main else None
    loop(run, parts, progress, tok, train_set, held_out, tracker, aside)
    return finish(run, parts, progress, tok, held_out, tracker)


def open_run(cfg: Config, overwrite: bool, resume: bool | None, protect: Iterable[str | Path]) -> Run:
    """Join the processes, decide where the run continues from, and refuse a bad output_dir, all before any
    slow loading."""
    validate(cfg)  # a Config built in code gets the checks a file gets
    tc = cfg.train
    d = dist.setup(tc.device)
    dist.check_grad_accum(tc.grad_accum, d)
    if not d.main:
        log.setLevel(logging.WARNING)  # one process reports; the others speak only of trouble
    parallel = choice("train.parallel", tc.parallel, ("ddp", "fsdp"))
    if d.enabled and parallel == "fsdp" and tc.generate_every_evals:
        raise ValueError("train.generate_every_evals needs the whole model on rank 0; set it to 0 with train.parallel=fsdp")
    if not tc.best_metric.startswith("eval_loss"):
        raise ValueError(f"train.best_metric: '{tc.best_metric}' should be eval_loss or eval_loss/DATASET")
    run_dir = Path(cfg.output_dir)
    if d.main:  # clears what an interrupted write left and sets damaged checkpoints aside, once, before anyone reads
        latest_checkpoint(run_dir)
        resume_point(run_dir)
    dist.barrier(d)
    checkpoint = resume_point(run_dir)
    wanted = resume if resume is not None else choice("train.resume", tc.resume, ("never", "auto")) == "auto"
    if resume and not run_dir.is_dir():
        raise rundir.RunDirError(f"--resume {run_dir}: there is no run there to resume (no such directory)")
    # A run killed before its first checkpoint has no progress to keep: it starts again from step 0, in place.
    restart = wanted and checkpoint is None and rundir.is_run(run_dir)
    if restart:
        log.info("%s has no checkpoint yet (stopped before its first one): starting it again from step 0", run_dir)
    elif resume and checkpoint is None:
        raise rundir.RunDirError(f"--resume {run_dir}: not a loratune run (no {rundir.MARKER} or config.yaml there); "
                                 "pass the output_dir of an earlier `loratune train`")
    resuming = wanted and checkpoint is not None
    if not resuming:  # a restart replaces the killed run, so it gets the same checks as --overwrite
        data_paths = [p for ds in cfg.data.datasets for p in [ds.path, *ds.data_files] if p != "demo"]
        rundir.check_output_dir(run_dir, overwrite or restart, [*protect, *data_paths])
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True)
    packed = use_fast_path(tc, device) or cfg.data.packing
    return Run(cfg, d, run_dir, device, checkpoint if resuming else None, replace=(overwrite and not resuming) or restart,
               packed=packed)


def already_finished(run: Run) -> Optional[dict]:
    """A finished run asked to resume: its final metrics, untouched (nothing is trained or rewritten)."""
    saved = run.dir / "final_metrics.json"
    if run.checkpoint is None or not saved.is_file():
        return None
    final = json.loads(saved.read_text())
    step = json.loads((run.checkpoint / "state.json").read_text())["step"]
    if step < run.steps or final.get("steps") != step:
        return None
    log.info("%s already finished at step %d; nothing to do (final metrics in %s)", run.dir, step, saved)
    dist.teardown(run.d)
    return final


def build_parts(run: Run, train_set: list[Example]) -> Parts:
    """Model + adapter, the loss module (wrapped for several processes), the CUDA-graphed step, the optimizer."""
    cfg, tc, d, device = run.cfg, run.cfg.train, run.d, run.device
    fast = use_fast_path(tc, device)
    dtype = autocast_dtype(tc, device)
    # No cast cache: a CUDA graph must recompute its casts at every replay (weights change between steps).
    autocast = torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    with phases("model"):
        model = prepare_for_training(load_base_model(cfg.model, device), cfg.method, cfg.lora, cfg.model.adapter)
    if run.checkpoint:
        load_weights(run.checkpoint, model)  # before DDP or FSDP wraps the model
    if d.enabled:
        torch.manual_seed(tc.seed + d.rank)  # same initial weights everywhere, but each rank its own dropout masks
    if tc.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    causal_lm = unwrap_causal_lm(model)
    if run.packed:
        use_packed_attention(model)
    slots = run.steps * tc.batch_size * tc.grad_accum * (cfg.data.max_length if run.packed else 0)
    compiled = worth_compiling(tc, slots) and fast and device.type == "cuda"
    if compiled:
        keep_compile_caches()
    loss_fn = torch.compile(packed_nll, dynamic=False) if compiled else packed_nll  # one row shape: one compilation
    parallel = choice("train.parallel", tc.parallel, ("ddp", "fsdp"))
    nll_module = SummedNLL(model, loss_fn, run.packed, share_prefix=not (d.enabled and parallel == "fsdp"))
    # Data parallel LoRA: no DDP wrapper. Each rank runs the same step as one process (a CUDA graph where it can),
    # then the adapter's few MB of gradients are summed over the ranks in one collective. Full fine-tuning keeps DDP,
    # whose bucketed all-reduce overlaps the backward of hundreds of MB of gradients.
    flat_sync = d.enabled and parallel == "ddp" and cfg.method == "lora"
    if d.enabled and not flat_sync:
        nll_module = dist.wrap(nll_module, causal_lm, parallel, device)
    params = [p for p in model.parameters() if p.requires_grad]  # after FSDP: it replaces them with sharded ones
    if flat_sync:
        dist.broadcast_params(params, d)
    graphs = choice("train.cuda_graphs", tc.cuda_graphs, ("auto", "on", "off"))
    blocker = graphs_blocker(device, run.packed, 1 if flat_sync else d.world, scaler is not None,
                             tc.gradient_checkpointing)
    if graphs == "on" and blocker:
        raise ValueError(f"train.cuda_graphs=on: {blocker}")
    graphed = None if blocker or graphs == "off" else GraphedMicroStep(
        lambda batch: _under(autocast, nll_module, batch), params, fallback=graphs == "auto")
    log.info("path: %s%s%s%s", "packed, compiled" if compiled else "packed" if run.packed else "plain (padded batches)",
             ", CUDA graphs" if graphed else "",
             f", {d.world} processes" + (" (flat gradient all-reduce)" if flat_sync else "") if d.enabled else "",
             f", {str(dtype).removeprefix('torch.')} autocast" if dtype else ", fp32")
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, run.steps))
    return Parts(model, nll_module, params, optimizer, scheduler, scaler, autocast, graphed,
                 dist.is_sharded(nll_module), flat_sync)


def start_writing(run: Run, report: list, p: Parts) -> Optional[Path]:
    """Create (or replace) the run directory, only now that loading worked: a failed start leaves no empty run
    behind and the old run as it was. Returns where a replaced run waits until the first step is done."""
    aside = None
    if run.d.main:
        aside = rundir.begin(run.dir, replace=run.replace)
        save_config(run.cfg, run.dir / "config.yaml")
        atomic_write(run.dir / "data_report.json", json.dumps(report, indent=2))  # the realised mix, for the report
        if converted_init(run.cfg) and not run.checkpoint:
            save_initial_adapter(p.model, run.dir)
    dist.barrier(run.d)
    return aside


def restore(run: Run, p: Parts) -> Progress:
    """The optimizer, scheduler, scaler and RNG states of the checkpoint this run continues from."""
    state = {"batches": 0, "evals": 0, "best": None, "best_checkpoint": None, "evals_without_improvement": 0}
    if run.checkpoint:
        state.update(load_training_state(
            run.checkpoint, lambda saved: dist.load_optimizer_state(p.nll_module, p.optimizer, saved, str(run.checkpoint)),
            p.scheduler, p.scaler, rank=run.d.rank))
        log.info("resumed from %s (step %d)", run.checkpoint, state["step"])
    start = state.pop("step", 0)
    return Progress(state, step=start, tokens_at_start=state.setdefault("tokens", 0))


def loop(run: Run, p: Parts, progress: Progress, tok, train_set: list[Example], held_out: list[Example],
         tracker: Optional[Tracker], aside: Optional[Path]) -> None:
    """The optimizer steps, each followed by what is due: a log sync, an eval, a checkpoint."""
    cfg, tc, d, device = run.cfg, run.cfg.train, run.d, run.device
    state = progress.state
    batches = all_batches(train_set, tc.batch_size, cfg.data.max_length if run.packed else None, tc.seed,
                          skip=state["batches"])
    gen_sample = [e for e in held_out if e.prompt_len > 0][: tc.generate_samples]
    last_save = time.monotonic()
    with StopRequest() as stop, phases("loop"):
        bar = tqdm(range(progress.step, run.steps), desc="train", unit="step", dynamic_ncols=True,
                   initial=progress.step, total=run.steps, disable=not d.main)
        for step in bar:
            # Every rank draws the whole step from the same stream and trains on its share of the micro-batches.
            micro = [next(batches) for _ in range(tc.grad_accum)]
            step_nll, n_trained, n_real = train_step(run, p, micro, tok.pad_token_id)
            state["batches"] += tc.grad_accum
            state["tokens"] += n_real
            progress.step = done = step + 1
            lr = p.scheduler.get_last_lr()[0]
            progress.pending.append((done, step_nll, n_trained, lr, state["tokens"]))
            if aside is not None:  # the new run has taken a step: the run it replaces can go
                rundir.finish_replacing(aside)
                aside = None

            # A sync costs nothing on the CPU, so there the bar moves every step; on the GPU it would stall the queue.
            if len(progress.pending) >= tc.log_every or device.type == "cpu":
                sync(run, progress, tracker)
                bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{_tokens_per_s(progress):,.0f}")
            due_by_time = tc.save_every_minutes > 0 and time.monotonic() - last_save >= tc.save_every_minutes * 60
            checkpoint_now = done == run.steps or (tc.save_every and done % tc.save_every == 0)
            checkpoint_now = dist.any_rank(due_by_time, d) or checkpoint_now  # every rank saves at the same step
            if tc.eval_every and (done % tc.eval_every == 0 or done == run.steps) and held_out:
                sync(run, progress, tracker)
                with phases("eval"):
                    checkpoint_now = periodic_eval(run, p, progress, tok, held_out, gen_sample, tracker) or checkpoint_now
            if dist.any_rank(stop.signal is not None, d):  # torchrun may deliver Ctrl-C to some ranks only
                progress.stop_reason = f"{stop.signal or 'a stop signal'} received"
            if checkpoint_now or progress.stop_reason:
                sync(run, progress, tracker)
                write_checkpoint(run, p, progress)
                last_save = time.monotonic()
            if progress.stop_reason:
                break
        sync(run, progress, tracker)
        bar.close()
    rundir.finish_replacing(aside)  # a run that had no step left to take
    if tracker:
        tracker.close()


def train_step(run: Run, p: Parts, micro: list, pad_id: int) -> tuple[torch.Tensor, int, int]:
    """One optimizer step over this rank's share of `micro`: (summed NLL on the device, trained tokens of the whole
    step, real tokens of the whole step)."""
    d, device = run.d, run.device
    counts = [token_counts(items, run.packed) for items in micro]
    # Normalise by the trained tokens of the whole step (every micro-batch of every rank), so the update equals the
    # one a single big batch would give, however the tokens fall across micro-batches.
    n_trained = max(sum(trained for trained, _ in counts), 1)
    mine = dist.my_share(micro, d)
    step_nll = torch.zeros((), device=device)
    for i, items in enumerate(mine):
        batch = to_device_batch(items, run.cfg.data, pad_id, device, run.packed)
        if p.graphed:
            step_nll += p.graphed(batch, 1 / n_trained)
            continue
        # DDP and FSDP average gradients over ranks once, after this rank's last micro-batch; hence x world. The flat
        # all-reduce sums them instead.
        with dist.gradient_sync(p.nll_module, on=i == len(mine) - 1):
            with p.autocast:
                nll = p.nll_module(batch)
            loss = nll * (1 if p.flat_sync else d.world) / n_trained
            (p.scaler.scale(loss) if p.scaler else loss).backward()
        step_nll += nll.detach()
    if p.flat_sync:
        dist.all_reduce_grads(p.params, d)
    if p.scaler:
        p.scaler.unscale_(p.optimizer)
    if run.cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(p.params, run.cfg.train.grad_clip)
    if p.scaler:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=p.graphed is None)  # a CUDA graph adds into the same .grad tensors
    return step_nll, n_trained, sum(real for _, real in counts)


def sync(run: Run, progress: Progress, tracker: Optional[Tracker]) -> None:
    """Bring pending losses to the host (summed over ranks): log them, and stop on NaN/inf before anything is
    checkpointed. Every rank calls it at the same steps."""
    if not progress.pending:
        return
    elapsed = time.perf_counter() - progress.start_time
    totals = dist.sum_over_ranks(torch.stack([entry[1] for entry in progress.pending]), run.d).tolist()
    for (n_step, _, n_tok, step_lr, tokens), total in zip(progress.pending, totals):
        progress.loss = total / n_tok
        if not math.isfinite(progress.loss):
            kept = latest_checkpoint(run.dir)
            raise TrainingError(f"loss is {progress.loss} at step {n_step}; stopping. Last good checkpoint: "
                                f"{kept or 'none written yet'}. Try a lower train.lr, or precision bf16/fp32")
        if tracker:
            tracker.log_train({"step": n_step, "loss": progress.loss, "lr": step_lr, "tokens": tokens,
                               "tokens_per_s": _tokens_per_s(progress, elapsed), "elapsed_s": elapsed})
    if tracker:
        tracker.flush()
    progress.pending.clear()


def _tokens_per_s(progress: Progress, elapsed: Optional[float] = None) -> float:
    elapsed = elapsed if elapsed is not None else time.perf_counter() - progress.start_time
    return (progress.state["tokens"] - progress.tokens_at_start) / elapsed


@phases("save")
def write_checkpoint(run: Run, p: Parts, progress: Progress) -> None:
    d = run.d
    rngs = dist.gather_to_main(rng_state(), d)  # every rank's RNG, so every rank resumes its own dropout stream
    weights = dist.full_weights(p.model) if p.sharded else None
    optim = dist.optimizer_state(p.nll_module, p.optimizer)
    if d.main:
        save_checkpoint(run.dir, progress.step, p.model, optim, p.scheduler, p.scaler, progress.state,
                        run.cfg.train.keep_checkpoints, protect=progress.state["best_checkpoint"], rngs=rngs,
                        weights=weights)
    dist.barrier(d)


def finish(run: Run, p: Parts, progress: Progress, tok, held_out: list[Example],
           tracker: Optional[Tracker]) -> tuple[Path, dict]:
    """Save the adapter, tokenizer, config and final metrics; or, when stopped by a signal, say how to resume."""
    cfg, d, state = run.cfg, run.d, progress.state
    last_loss = tracker.train_points[-1][1] if tracker and tracker.train_points else progress.loss
    final = {"method": cfg.method, "trainable_parameters": count_parameters(p.model)[0],
             "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None,
             "steps": progress.step, "train_loss": last_loss, "tokens": state["tokens"],
             "train_seconds": time.perf_counter() - progress.start_time, "held_out_examples": len(held_out),
             "best": state["best"], "best_checkpoint": state["best_checkpoint"], "stopped": progress.stop_reason,
             "processes": d.world}
    if progress.stop_reason and progress.stop_reason.endswith("received"):
        log.warning("%s at step %d: checkpoint written. Resume with:  loratune train --resume %s",
                    progress.stop_reason, progress.step, run.dir)
        dist.teardown(d)
        return run.dir, {**final, "interrupted": True}
    weights = dist.full_weights(p.model) if p.sharded else None
    if d.main:
        with phases("save"):
            save_run(p.model, tok, cfg, run.dir, final, state_dict=weights)
    dist.barrier(d)
    dist.teardown(d)
    log.info("saved adapter to %s (%.0f s, final loss %.4f)%s", run.dir, final["train_seconds"], last_loss,
             f"; {progress.stop_reason}" if progress.stop_reason else "")
    return run.dir, final


def _under(context, fn, *args):
    with context:
        return fn(*args)
