"""Which examples each optimizer step (and each process) trains on, and how they reach the device.

The order is a pure function of (seed, epoch): every process computes the same stream of micro-batches, so a
resumed run skips exactly what it consumed, and processes can split each step's micro-batches without talking.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..config import DataConfig
from .examples import IGNORE, Example, collate
from .packing import collate_packed, pack_rows


def epoch_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int, epoch: int) -> list:
    """One epoch's batches, fixed by seed + epoch: lists of examples, or with packing lists of rows of examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if row_len is None:
        items = [examples[i] for i in order]
    else:
        items = [[examples[i] for i in row] for row in pack_rows(examples, order, row_len)]
    batch_size = min(batch_size, len(items))
    return [items[s : s + batch_size] for s in range(0, len(items) - batch_size + 1, batch_size)]


def all_batches(examples: list[Example], batch_size: int, row_len: int | None, seed: int, skip: int = 0) -> Iterator[list]:
    """Every batch in order, forever, starting after the first `skip` (the data position of a resumed run)."""
    epoch = 0
    while True:
        batches = epoch_batches(examples, batch_size, row_len, seed, epoch)
        if skip >= len(batches):
            skip -= len(batches)
        else:
            yield from batches[skip:]
            skip = 0
        epoch += 1


def token_counts(items: list, packed: bool) -> tuple[int, int]:
    """(trained tokens, real tokens) of a micro-batch, counted on the CPU from its examples: the step needs no
    host sync for them, and every process knows the counts of the micro-batches the others train on."""
    examples = [e for row in items for e in row] if packed else items
    tails = (e.labels[1:] for e in examples)  # the first token predicts nothing
    trained = sum(len(tail) - tail.count(IGNORE) for tail in tails)  # list.count: this runs every step
    return trained, sum(len(e.input_ids) for e in examples)


def to_device_batch(items: list, data: DataConfig, pad_id: int, device: torch.device, packed: bool) -> dict:
    """Collate on the CPU and copy over without blocking."""
    batch = collate_packed(items, data.max_length, pad_id) if packed else collate(items, pad_id)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
