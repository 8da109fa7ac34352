"""Evaluation during training: the loop calls `periodic_eval` every train.eval_every steps."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..data.batches import to_device_batch, token_counts
from ..data.examples import Example
from ..data.packing import pack_rows
from ..evaluation.metrics import score_generations
from ..inference.generate import generate_batch
from ..model.attention import ATTENTION_NAME
from ..model.load import unwrap_causal_lm
from .distributed import Dist, inner, my_share, sum_over_ranks
from .state import Parts, Progress, Run
from .tracking import Tracker

log = logging.getLogger("loratune")


@torch.no_grad()
def held_out_losses(model: torch.nn.Module, held_out: list[Example], nll_of, autocast, d: Dist,
                    device: torch.device) -> dict[str, float]:
    """Mean held-out loss (nats per trained token), overall and per dataset; nll_of(examples) -> (sum, count).
    Each process scores its share of every dataset; the sums are added up, so every rank gets the same numbers."""
    model.eval()
    by_dataset: dict[str, list[Example]] = {}
    for e in held_out:
        by_dataset.setdefault(e.record.get("dataset", "data"), []).append(e)
    with autocast:
        shares = [nll_of(my_share(group, d)) for group in by_dataset.values()]
    model.train()
    sums = dict(zip(by_dataset, sum_over_ranks(torch.tensor(shares, dtype=torch.float64, device=device), d).tolist()))
    out = {"eval_loss": sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)}
    if len(sums) > 1:
        out.update({f"eval_loss/{name}": t / max(n, 1) for name, (t, n) in sums.items()})
    return out


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, tok, sample: list[Example], max_new_tokens: int, packed: bool,
                       autocast) -> dict[str, float]:
    """Greedy answers for a fixed held-out sample, scored like `loratune eval` (keys prefixed gen/)."""
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


def periodic_eval(run: Run, p: Parts, progress: Progress, tok, held_out: list[Example], gen_sample: list[Example],
                  tracker: Optional[Tracker]) -> bool:
    """Held-out losses (and every generate_every_evals evals, generation metrics); track the best and early
    stopping. True when this eval is the best so far: its checkpoint is always kept."""
    tc, d, state = run.cfg.train, run.d, progress.state
    # FSDP gathers weights in every forward, so there each rank scores all of it (same number of calls).
    metrics = held_out_losses(p.model, held_out, lambda examples: held_out_nll(run, p, tok, examples), p.autocast,
                              Dist() if p.sharded else d, run.device)
    state["evals"] += 1
    if tc.generate_every_evals and state["evals"] % tc.generate_every_evals == 0 and gen_sample and d.main:
        metrics.update(generation_metrics(p.model, tok, gen_sample, run.cfg.eval.max_new_tokens, run.packed,
                                          p.autocast))
    if tracker:
        tracker.log_eval(progress.step, metrics)
    log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if tc.best_metric not in metrics:
        raise ValueError(f"train.best_metric: '{tc.best_metric}' is not among {sorted(metrics)}")
    improved = state["best"] is None or metrics[tc.best_metric] < state["best"] - tc.early_stopping_min_delta
    if run.on_eval and d.main:
        progress.stop_reason = run.on_eval(progress.step, metrics) or progress.stop_reason
    if improved:
        state.update(best=metrics[tc.best_metric], best_checkpoint=f"step-{progress.step:06d}",
                     evals_without_improvement=0)
        return True
    state["evals_without_improvement"] += 1
    if tc.early_stopping_patience and state["evals_without_improvement"] >= tc.early_stopping_patience:
        progress.stop_reason = f"early stopping: {tc.best_metric} has not improved for {tc.early_stopping_patience} evals"
    return False


def held_out_nll(run: Run, p: Parts, tok, examples: list[Example]) -> tuple[float, int]:
    """Held-out NLL through the training path; packed batches keep the training shape (no recompile)."""
    tc, row_len = run.cfg.train, run.cfg.data.max_length
    if run.packed:
        rows = pack_rows(examples, list(range(len(examples))), row_len)
        groups = [[[examples[i] for i in row] for row in rows[f : f + tc.batch_size]]
                  for f in range(0, len(rows), tc.batch_size)]
    else:
        groups = [examples[f : f + tc.batch_size] for f in range(0, len(examples), tc.batch_size)]
    total, count = 0.0, 0
    for group in groups:
        padded = group + [[]] * (tc.batch_size - len(group)) if run.packed else group
        batch = to_device_batch(padded, run.cfg.data, tok.pad_token_id, run.device, run.packed)
        total, count = total + inner(p.nll_module)(batch).item(), count + token_counts(group, run.packed)[0]
    return total, count
