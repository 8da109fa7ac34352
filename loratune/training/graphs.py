"""CUDA graphs for the training micro-step.

A small model's step is bound by the host, not the GPU: HF + peft launch thousands of small kernels per forward and
backward, each costing Python and dispatcher time. Packed rows give every micro-batch the same shapes, so its forward
and backward can be recorded once as a CUDA graph and then replayed with one launch. On an H100, a step of the
SmolLM2-135M shape on 4 x 256 packed tokens took 30.6 ms with plain launches and 16.8 ms replayed (BENCHMARKS.md).

What the replay relies on:
- the inputs are copied into the same (static) tensors before every replay;
- gradients accumulate in place into .grad tensors that exist before the capture and are never set to None
  (the loop zeroes them in place after the optimizer step);
- the Python control flow recorded at capture (train mode, the adapter in use) stays as it was.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..timing import phases

log = logging.getLogger("loratune")


def graphs_blocker(device: torch.device, packed: bool, processes: int, fp16_scaler: bool, checkpointing: bool) -> str | None:
    """Why this run can't use CUDA graphs (None: it can)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not packed:
        return "CUDA graphs need fixed shapes: turn on data.packing (padded batches change length)"
    if processes > 1:
        return "CUDA graphs are not used with DDP's wrapper or FSDP (they communicate inside the step)"
    if fp16_scaler:
        return "CUDA graphs are not used with precision=fp16 (its grad scaler checks for inf on the host)"
    if checkpointing:
        return "CUDA graphs are not used with gradient_checkpointing"
    return None


class GraphedMicroStep:
    """`step(batch, scale)` = forward, then backward of loss(batch) * scale, accumulated into the parameters' .grad;
    returns the (detached) loss. The first call captures; every later call replays. With `fallback`, a capture that
    fails (an op that syncs with the host, say) is reported once and the step runs eagerly from then on."""

    def __init__(self, loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.Tensor],
                 fallback: bool, warmup: int = 2):
        self.loss_of, self.params, self.fallback, self.warmup = loss_of, params, fallback, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.inputs: dict[str, torch.Tensor] = {}
        self.scale = torch.zeros(())
        self.loss = torch.zeros(())

    def _body(self, inputs: dict[str, torch.Tensor], scale: torch.Tensor | float) -> torch.Tensor:
        loss = self.loss_of(inputs)
        (loss * scale).backward()
        return loss.detach()

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        self.inputs = {k: v.clone() for k, v in batch.items()}
        self.scale = torch.zeros((), device=next(iter(batch.values())).device)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # so that the captured backward adds into memory that outlives it
        saved = [p.grad.clone() for p in self.params]  # warmup runs for real; it must leave the gradients as they were
        try:
            # Lazy initialisations (cuBLAS handles, autotuning, compiled kernels) must not happen during capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._body(self.inputs, self.scale)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._body(self.inputs, self.scale)
        finally:
            for p, g in zip(self.params, saved):
                p.grad.copy_(g)

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        if self.graph is None and not self.eager:
            try:
                with phases("capture"):  # compilation, if any, happens here too: in the warm-up runs
                    self._capture(batch)
            except RuntimeError as e:
                if not self.fallback:
                    raise
                self.graph, self.eager = None, True
                log.warning("CUDA graph capture failed, training with plain launches (set train.cuda_graphs=off to "
                            "skip the attempt): %s", str(e).splitlines()[0][:300])
        # A batch of another shape (an epoch of tiny data packed into fewer rows than batch_size) runs eagerly:
        # copied into the static inputs it would broadcast silently.
        if self.eager or any(v.shape != self.inputs[k].shape for k, v in batch.items()):
            return self._body(batch, scale)
        for k, v in batch.items():
            self.inputs[k].copy_(v, non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        return self.loss
