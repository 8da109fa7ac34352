"""The GPU fast path: packed rows without cross-contamination, one compiled graph per step.

- Packing: examples are packed into fixed-length rows (static shapes, so torch.compile compiles once).
  Each example attends only to itself (a document-causal mask: flex attention with a block mask when compiled,
  SDPA with the dense mask otherwise) and its position ids restart at 0, so a packed example computes exactly
  what it would alone.
- One graph: the block mask, the backbone, the LM head and the cross-entropy (loss.packed_nll) are compiled together.
  Measured on an H100 (GPT-2 shape, 16 x 1024 rows), that ran at 37 ms/step and 8.5 GiB peak, against
  77 ms/step for a compiled backbone followed by an eager chunked linear cross-entropy, which avoided
  full logits but cost more in memory traffic than it saved (see BENCHMARKS.md).
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
    """Each token sees earlier tokens of its own document.

    Inside a compiled graph on CUDA: a flex BlockMask (flex attention compiles to a fused kernel that skips the
    masked blocks: the fast path's long rows need that). Elsewhere: the same mask as a dense (B, 1, L, L) boolean
    tensor for SDPA, because flex attention outside a compiled graph must compile its own kernels first (10-20 s
    on an H100 at the first step of every run and row shape), and on the CPU it has no backward.
    """
    if not (doc_ids.is_cuda and torch.compiler.is_compiling()):
        causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
        return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    batch, length = doc_ids.shape
    return create_block_mask(same_document_causal, batch, None, length, length, device=doc_ids.device, _compile=False)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     loratune_document_mask: BlockMask | torch.Tensor | None = None, **kwargs):
    """transformers attention function: (B, H, T, D) in, (B, T, H, D) out. Attention-probability
    dropout is not applied (flex attention has none); residual and embedding dropout still are."""
    mask = loratune_document_mask
    if mask is None:
        raise RuntimeError("the packed attention path needs loratune_document_mask; call the model through loratune.fast")
    if isinstance(mask, BlockMask):
        out = flex_attention(query, key, value, block_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    else:
        # Grouped-query heads are repeated by hand: SDPA's memory-efficient kernel, the one that takes an arbitrary
        # mask, has no GQA, and its fallback would materialise the attention matrix.
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, packed_attention)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a (peft-wrapped) transformers model to the packed attention function."""
    from .model import unwrap_causal_lm

    unwrap_causal_lm(model).set_attn_implementation(ATTENTION_NAME)
