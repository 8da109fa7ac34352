"""The training loss: a batch's summed next-token NLL over trained positions, padded or packed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.examples import IGNORE
from .attention import document_mask
from .load import cache_kwarg, checkpointing_on, output_cache, unwrap_causal_lm

# Padded rows: fewer shared tokens than this are not worth a second backbone call.
MIN_SHARED_PREFIX = 4
# A padded batch runs as one row (one_row) up to this many real tokens. Measured on the demo model (SmolLM2-135M,
# 2-core CPU, batches of 8 to 64 demo chats), one row against padded rows with the prefix cache: 13% faster at
# ~210 tokens, 7% at ~420, even at ~840, 30% slower at ~1,660 (the dense attention's square takes over).
ONE_ROW_MAX_TOKENS = 512


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


def one_row(batch: dict[str, torch.Tensor], shared: int) -> dict[str, torch.Tensor]:
    """A right-padded batch's real tokens as one row: the first `shared` tokens (a prefix every row shares, see
    shared_prefix_len) once, then each row's own tokens. With their positions in their own row, a (1, 1, T, T)
    boolean mask in which each token sees the shared prefix and the earlier tokens of its own row (the same
    attention inputs as the padded batch, so the same results), and each position's next-token target."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    real = mask.bool() & ((columns >= shared) | (torch.arange(len(ids), device=ids.device) == 0)[:, None])
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
    doc = torch.where(columns < shared, -1, rows)[real]  # -1: the shared prefix, seen by every row
    attend = ((doc[None, :] == doc[:, None]) | (doc[None, :] == -1)).tril()
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t + 1; a row's last predicts none
    return {"input_ids": ids[real][None], "position_ids": columns[real][None], "attention_mask": attend[None, None],
            "targets": targets[real]}


def one_row_fits(backbone: torch.nn.Module, batch: dict[str, torch.Tensor], shared: int) -> bool:
    """One row needs SDPA (the attention that takes a boolean 4D mask as given), and a short row: its attention is
    dense over the whole row, so its cost grows with the row's square where padded rows grow with their own."""
    tokens = int(batch["attention_mask"].sum()) - (len(batch["input_ids"]) - 1) * shared
    return backbone.config._attn_implementation == "sdpa" and tokens <= ONE_ROW_MAX_TOKENS


def padded_hidden(backbone: torch.nn.Module, batch: dict[str, torch.Tensor], shared: int) -> tuple[torch.Tensor, int]:
    """(last hidden states, offset) of a padded batch: the hidden states of positions offset.. of every row.

    With `shared` > 0 the shared prefix runs once (batch 1) and the rows continue from its keys and values,
    repeated over the batch: the same attention inputs as running each row whole, so the same results, and the
    prefix's gradients are the sum of what every row sends back through it."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not shared:
        return backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, 0
    cache = output_cache(backbone, backbone(input_ids=ids[:1, :shared], use_cache=True))
    cache.batch_repeat_interleave(len(ids))
    positions = torch.arange(shared, ids.shape[1], device=ids.device).expand(len(ids), -1)
    rest = backbone(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_kwarg(backbone): cache}).last_hidden_state
    return rest, shared


def trained_hidden(causal_lm: torch.nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, targets) of the positions of a padded batch that predict a trained token.

    Short batches run as one row (one_row): no padding goes through the model. With `share_prefix`, a prefix all
    rows share runs once (on the demo chats the system prompt, 45% of each example's tokens). Otherwise the rows
    stay padded and share their prefix through a key/value cache (padded_hidden)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    shared = shared_prefix_len(batch) if share_prefix else 0
    if one_row_fits(backbone, batch, shared):
        row = one_row(batch, shared)
        hidden = backbone(input_ids=row["input_ids"], position_ids=row["position_ids"],
                          attention_mask=row["attention_mask"], use_cache=False).last_hidden_state[0]
        keep = row["targets"] != IGNORE
        return hidden[keep], row["targets"][keep]
    if shared < MIN_SHARED_PREFIX or checkpointing_on(causal_lm):  # checkpointing drops the cache
        shared = 0
    hidden, offset = padded_hidden(backbone, batch, shared)
    targets = batch["labels"][:, offset + 1 :]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def sum_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048,
                  share_prefix: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over trained positions of a padded batch, and their count.

    The LM head runs only on positions that have a label, a chunk at a time, so the full
    (batch x length x vocab) logits tensor is never built: prompt tokens cost no head FLOPs.
    `share_prefix`: see trained_hidden.
    """
    causal_lm = unwrap_causal_lm(model)
    hidden, targets = trained_hidden(causal_lm, batch, share_prefix)
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
