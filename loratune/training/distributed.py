"""Data parallelism with torch.distributed: started by torchrun (or `loratune train --nproc N`), DDP over NCCL on
GPUs or gloo on CPUs.

One config describes one optimisation, whatever the number of processes. A step trains on
`train.grad_accum` micro-batches of `train.batch_size` examples (rows when packed); N processes split each
step's micro-batches between them, rank r taking micro-batches r, r + N, ... of the step. So the global batch,
the learning rate and its schedule, the data order and (to float rounding) the losses do not change with N, and
a run can resume with another N. `train.grad_accum` must therefore be a multiple of N.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    """Global rank; rank 0 alone writes logs, progress bars, checkpoints and the final run."""
    world: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine: the GPU this process uses."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_control_group = None  # gloo: CPU-side agreement (stop requests, RNG states) without touching the GPU stream
_owns_process_group = False  # set up here (not by a caller that had initialised torch.distributed itself)


def setup(device_spec: str) -> Dist:
    """Join the job torchrun started (its environment says so); a plain process is rank 0 of 1."""
    global _control_group, _owns_process_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        _owns_process_group = True
    _control_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return Dist(rank, world, local_rank)


def check_grad_accum(grad_accum: int, d: Dist) -> None:
    if grad_accum % d.world:
        raise ValueError(f"train.grad_accum={grad_accum} is not a multiple of the {d.world} processes: each step's "
                         f"micro-batches are split between them. Set train.grad_accum to a multiple of {d.world} (and "
                         "divide train.batch_size by the same factor to keep the global batch)")


def my_share(items: list, d: Dist) -> list:
    """This rank's part of a list every rank holds in the same order: disjoint, and together all of it."""
    return items[d.rank :: d.world]


def sum_over_ranks(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if it is true on one (e.g. only some ranks got the Ctrl-C)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0, group=_control_group)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier(group=_control_group)


def teardown(d: Dist) -> None:
    global _owns_process_group
    if d.enabled and _owns_process_group:
        dist.destroy_process_group()
        _owns_process_group = False


def wrap(module: torch.nn.Module, causal_lm: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """`ddp`: every rank holds the whole model, gradients are averaged. `fsdp` (FSDP2): parameters, gradients and
    optimizer state are sharded; each transformer block (the model's _no_split_modules) is gathered just
    before it runs and freed after, the rest (embeddings, head, final norm) with the root `module`."""
    if parallel == "ddp":
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(causal_lm, "_no_split_modules", None) or [])
    for sub in causal_lm.modules():
        if type(sub).__name__ in blocks:
            fully_shard(sub)
    fully_shard(module)
    return module


def broadcast_params(params: list[torch.Tensor], d: Dist) -> None:
    """Every rank starts from rank 0's trainable weights (what DDP's wrapper does for the runs it wraps)."""
    if d.enabled:
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Sum the gradients of `params` over the ranks, as one flat buffer: a LoRA adapter's few MB go in one collective
    after the rank's micro-batches, outside the step, so the step itself can be replayed as a CUDA graph."""
    if not d.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, summed in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = summed
        else:
            p.grad.copy_(summed)


def is_sharded(module: torch.nn.Module) -> bool:
    return not isinstance(module, DistributedDataParallel) and hasattr(module, "set_requires_gradient_sync")


def gradient_sync(module: torch.nn.Module, on: bool):
    """Context for one micro-batch: gradients are averaged over ranks only after a rank's last micro-batch."""
    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if on else module.no_sync()
    if is_sharded(module):
        module.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def inner(module: torch.nn.Module) -> torch.nn.Module:
    """The module to call outside training steps (held-out loss): DDP's wrapper runs collectives in its forward,
    which ranks doing different amounts of evaluation must not; FSDP's root must run to gather its weights."""
    return module.module if isinstance(module, DistributedDataParallel) else module


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_weights(model: torch.nn.Module) -> dict:
    """The trainable weights (and buffers) of a sharded model, whole, on rank 0's CPU; every rank must call it.
    Frozen base weights are left out: a LoRA checkpoint stores only the adapter, so gathering them is wasted."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**_FULL, ignore_frozen_params=True))


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint stores of the optimizer; for a sharded model, the gathered full state keyed by parameter
    name (every rank must call it)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return {"fsdp_full": get_optimizer_state_dict(module, optimizer, options=StateDictOptions(**_FULL))}


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, where: str) -> None:
    if ("fsdp_full" in saved) != is_sharded(module):
        written = "fsdp" if "fsdp_full" in saved else "ddp"
        raise ValueError(f"{where} was written with train.parallel={written} (or one process); resume it with "
                         f"--train.parallel={written}, or with no CONFIG so that the run's own config.yaml is used")
    if "fsdp_full" not in saved:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, saved["fsdp_full"], options=StateDictOptions(full_state_dict=True))


def launch(nproc: int, argv: list[str]) -> int:
    """`loratune train --nproc N ...`: the same command under torchrun on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "loratune", "train", *argv]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
