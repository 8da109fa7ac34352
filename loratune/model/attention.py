"""Attention for packed rows (data/packing.py), and the fast path's one compiled graph per step.

- Each packed example attends only to itself: a document-causal mask, flex attention with a block mask when
  compiled, SDPA with the dense mask otherwise.
- One graph: the block mask, the backbone, the LM head and the cross-entropy (loss.packed_nll) are compiled together.
  Measured on an H100 (GPT-2 shape, 16 x 1024 rows), that ran at 37 ms/step and 8.5 GiB peak, against
  77 ms/step for a compiled backbone followed by an eager chunked linear cross-entropy, which avoided
  full logits but cost more in memory traffic than it saved (see BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface

from .load import unwrap_causal_lm

ATTENTION_NAME = "loratune_packed"


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
        raise RuntimeError("the packed attention path needs loratune_document_mask; call the model through loratune.model.loss")
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
    unwrap_causal_lm(model).set_attn_implementation(ATTENTION_NAME)
