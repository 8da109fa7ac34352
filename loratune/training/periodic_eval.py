"""Evaluation during training: the loop calls these every train.eval_every steps."""

from __future__ import annotations

import torch

from ..data.examples import Example
from ..evaluation.metrics import score_generations
from ..inference.generate import generate_batch
from ..model.attention import ATTENTION_NAME
from ..model.load import unwrap_causal_lm
from .distributed import Dist, my_share, sum_over_ranks


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
