"""Packing: examples into fixed-length rows without cross-contamination.

Examples are packed best-fit into rows of max_length tokens (static shapes, so torch.compile compiles once). Each
example's position ids restart at 0 and its document id tells the attention mask (model/attention.py) which tokens
it may see, so a packed example computes exactly what it would alone. The number of trained tokens is counted on
the CPU while collating: no host syncs inside a step.
"""

from __future__ import annotations

import bisect

import torch

from .examples import IGNORE, Example


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
