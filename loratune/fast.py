"""The GPU fast path: packed rows without cross-contamination, no full-vocabulary logits, a compiled backbone.

- Packing: examples are packed into fixed-length rows (static shapes, so torch.compile compiles once).
  Each example attends only to itself (flex attention with a document-causal block mask) and its
  position ids restart at 0, so a packed example computes exactly what it would alone.
- Loss: `linear_cross_entropy` runs the LM head a chunk of tokens at a time and computes the
  gradient w.r.t. the hidden states in the same pass, so (tokens x vocab) logits never exist at once.
- No host syncs inside a step: the number of trained tokens is counted on the CPU while collating.
"""

from __future__ import annotations

import bisect

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface

from .data import IGNORE, Example

ATTENTION_NAME = "loratune_packed"


def pack_rows(examples: list[Example], order: list[int], row_len: int) -> list[list[int]]:
    """Best-fit packing of examples (taken in `order`) into rows of at most `row_len` tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in order:
        n = len(examples[i].input_ids)
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([i])
            room, row = row_len - n, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def shifted_targets(example: Example) -> list[int]:
    """Next-token targets of one example; its last position predicts nothing, so no target crosses into a neighbour."""
    return example.labels[1:] + [IGNORE]


def collate_packed(rows: list[list[Example]], row_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), row_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), row_len), dtype=torch.long)
    docs = torch.full((len(rows), row_len), -1, dtype=torch.long)  # padding: its own document
    for r, row in enumerate(rows):
        start = 0
        for d, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, start : start + n] = torch.tensor(e.input_ids)
            targets[r, start : start + n] = torch.tensor(shifted_targets(e))
            positions[r, start : start + n] = torch.arange(n)
            docs[r, start : start + n] = d
            start += n
    return {"input_ids": ids, "targets": targets, "position_ids": positions, "doc_ids": docs}


def document_mask(doc_ids: torch.Tensor) -> BlockMask | torch.Tensor:
    """Each token sees earlier tokens of its own document. A flex BlockMask on CUDA; on the CPU,
    where flex attention has no backward, the same mask as a dense (B, 1, L, L) boolean tensor."""
    if not doc_ids.is_cuda:
        causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool).tril()
        return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    batch, length = doc_ids.shape
    return create_block_mask(same_document_causal, batch, None, length, length, device=doc_ids.device, _compile=True)


# Eager flex attention is a slow reference implementation; compiled it is a fused kernel. Inside an
# already-compiled backbone the plain function is traced into that graph instead.
_compiled_flex = torch.compile(flex_attention)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     loratune_document_mask: BlockMask | torch.Tensor | None = None, **kwargs):
    """transformers attention function: (B, H, T, D) in, (B, T, H, D) out. Attention-probability
    dropout is not applied (flex attention has none); residual and embedding dropout still are."""
    mask = loratune_document_mask
    if mask is None:
        raise RuntimeError("the packed attention path needs loratune_document_mask; call the model through loratune.fast")
    gqa = query.shape[1] != key.shape[1]
    if isinstance(mask, BlockMask):
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex
        out = attend(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, packed_attention)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against targets, chunk by chunk.

    The frozen head's weight gets no gradient (LoRA leaves it alone); the gradient w.r.t. hidden is
    computed in the forward pass and kept, which costs one (tokens x hidden) tensor instead of logits.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            valid = t != IGNORE
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
            if grad is not None:
                probs = torch.exp(logits - lse[:, None])
                probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(probs[:, :1]))
                probs *= valid[:, None]
                grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk)


def packed_nll(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL of a packed batch (see collate_packed), on the device the batch is on."""
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      loratune_document_mask=document_mask(batch["doc_ids"])).last_hidden_state
    if supports_fast_head(head):
        return linear_cross_entropy(hidden, head.weight, batch["targets"])
    # A head with a bias or its own LoRA: the plain way, still a chunk at a time.
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), batch["targets"].reshape(-1)
    return sum(torch.nn.functional.cross_entropy(head(hidden[i : i + 8192]).float(), targets[i : i + 8192],
                                                 reduction="sum") for i in range(0, targets.numel(), 8192))


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a (peft-wrapped) transformers model to the packed attention function."""
    from .model import unwrap_causal_lm

    unwrap_causal_lm(model).set_attn_implementation(ATTENTION_NAME)


def supports_fast_head(head: torch.nn.Module) -> bool:
    """The fused loss needs a plain bias-free linear head (true for GPT-2, GPT-NeoX and Llama)."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
