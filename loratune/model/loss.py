"""The training loss: a batch's summed next-token NLL over trained positions, padded or packed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.examples import IGNORE
from .attention import document_mask
from .load import cache_kwarg, checkpointing_on, unwrap_causal_lm

# Fewer shared tokens than this are not worth a second backbone call.
MIN_SHARED_PREFIX = 4


def shared_prefix_len(batch: dict[str, torch.Tensor]) -> int:
    """Leading tokens that every row of a right-padded batch shares and that train nothing (a chat template's system
    prompt, an instruction repeated in every record): the backbone can run them once for the whole batch."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0)
    common = int(same.long().cumprod(0).sum())
    trained = (labels != IGNORE).any(0)
    first_trained = int(trained.long().argmax()) if bool(trained.any()) else ids.shape[1]
    # Position t predicts token t + 1: the shared positions must predict only untrained tokens, and every row keeps
    # at least one token of its own after them.
    return max(0, min(common, first_trained - 1, int(mask.sum(1).min()) - 1))


def backbone_hidden(backbone: torch.nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool) -> tuple[torch.Tensor, int]:
    """(last hidden states, offset): the hidden states of positions offset.. of every row.

    With `share_prefix`, a prefix all rows share runs once (batch 1), and the rows continue from its keys and
    values, repeated over the batch: the same attention inputs as running each row whole, so the same results, and
    the prefix's gradients are the sum of what every row sends back through it. On the demo chats the shared
    system prompt is about 45% of each example's tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shared = shared_prefix_len(batch) if share_prefix else 0
    if shared < MIN_SHARED_PREFIX:
        return backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, 0
    cache = backbone(input_ids=ids[:1, :shared], use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(ids))
    positions = torch.arange(shared, ids.shape[1], device=ids.device).expand(len(ids), -1)
    rest = backbone(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_kwarg(backbone): cache}).last_hidden_state
    return rest, shared


def sum_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048,
                  share_prefix: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over trained positions of a padded batch, and their count.

    The LM head runs only on positions that have a label, a chunk at a time, so the full
    (batch x length x vocab) logits tensor is never built: prompt tokens cost no head FLOPs.
    `share_prefix`: see backbone_hidden.
    """
    causal_lm = unwrap_causal_lm(model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    share_prefix = share_prefix and not checkpointing_on(causal_lm)  # it drops the cache
    hidden, offset = backbone_hidden(backbone, batch, share_prefix)
    targets = batch["labels"][:, offset + 1 :]
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

    def __init__(self, model: torch.nn.Module, loss_fn, packed: bool, share_prefix: bool = True):
        super().__init__()
        self.model, self.loss_fn, self.packed = model, loss_fn, packed
        # With dropout a shared prefix would draw one mask for all rows instead of one per row: not the same
        # training, so padded batches share their prefix only without it (the shipped demo config has none).
        # `share_prefix=False` under FSDP: it frees a layer's gathered weights after its forward, and the
        # shared prefix runs every layer twice in one forward.
        dropout = (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
                   or getattr(unwrap_causal_lm(model).config, "attention_dropout", 0.0))  # functional in Llama
        self.share_prefix = share_prefix and not dropout

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.packed:
            return sum_token_nll(self.model, batch, share_prefix=self.share_prefix)[0]
        causal_lm = unwrap_causal_lm(self.model)
        return self.loss_fn(getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings(), batch)
