"""The training loss: a batch's summed next-token NLL over trained positions, padded or packed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.examples import IGNORE
from .attention import document_mask
from .load import unwrap_causal_lm


def sum_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over trained positions of a padded batch, and their count.

    The LM head runs only on positions that have a label, a chunk at a time, so the full
    (batch x length x vocab) logits tensor is never built: prompt tokens cost no head FLOPs.
    """
    causal_lm = unwrap_causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        logits = head(hidden[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total, int(targets.numel())


def packed_nll(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL of a packed batch (see collate_packed). Compile it whole on the GPU (the fast path does)."""
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      loratune_document_mask=document_mask(batch["doc_ids"])).last_hidden_state
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), batch["targets"].view(-1), reduction="sum")


class SummedNLL(torch.nn.Module):
    """A batch's summed next-token NLL as a module's forward: DistributedDataParallel synchronises the gradients
    of what its wrapped forward ran, and the fast path calls the backbone and head directly."""

    def __init__(self, model: torch.nn.Module, loss_fn, packed: bool):
        super().__init__()
        self.model, self.loss_fn, self.packed = model, loss_fn, packed

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.packed:
            return sum_token_nll(self.model, batch)[0]
        causal_lm = unwrap_causal_lm(self.model)
        return self.loss_fn(getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings(), batch)
