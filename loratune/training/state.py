"""What the phases of the recipe share: where and how the run happens (Run), the model side of the step (Parts),
what the loop has done so far (Progress), and the flag a Ctrl-C or SIGTERM sets (StopRequest)."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from .distributed import Dist
from .graphs import GraphedMicroStep


class TrainingError(RuntimeError):
    """Training can't go on (e.g. the loss became NaN); the message says where and what was kept."""


@dataclass
class Run:
    """Where and how this run happens."""

    cfg: Config
    d: Dist
    """This process's place among the processes of the job."""
    dir: Path
    device: torch.device
    checkpoint: Optional[Path]
    """The checkpoint this run continues from; None: it starts at step 0."""
    replace: bool
    """What output_dir holds is moved aside and replaced (--overwrite, or a run killed before its first checkpoint)."""
    packed: bool
    """Examples packed into rows of data.max_length tokens (the fast path, or data.packing)."""
    steps: int = 0
    """Optimizer steps of the whole run."""
    on_eval: Optional[Callable[[int, dict], Optional[str]]] = None
    """Told each periodic eval's (step, metrics); a string it returns stops the run (train()'s on_eval)."""


@dataclass
class Parts:
    """The model side of a step."""

    model: torch.nn.Module
    nll_module: torch.nn.Module
    """The model and its loss as one module (wrapped by DDP or FSDP when distributed)."""
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    autocast: contextlib.AbstractContextManager
    graphed: Optional[GraphedMicroStep]
    sharded: bool
    flat_sync: bool = False
    """Several processes without a DDP wrapper: gradients are summed over the ranks in one flat all-reduce."""


@dataclass
class Progress:
    """What the loop has done so far; `state` is what a checkpoint saves of it."""

    state: dict
    step: int
    loss: float = float("nan")
    start_time: float = field(default_factory=time.perf_counter)
    tokens_at_start: int = 0
    pending: list = field(default_factory=list)
    """(step, summed NLL on the device, trained tokens, lr, tokens seen): losses wait on the device for a sync."""
    stop_reason: Optional[str] = None


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, writes a checkpoint and returns."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
