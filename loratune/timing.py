"""Where a command's time went, as one line at its end: `import 2.1 s · model 0.4 s · data 0.9 s · loop 9.8 s`.

Code marks its phases with `with phases("model"): ...`. Phases nest, and each reports only its own time: a
checkpoint written inside the loop counts as `save`, not as `loop`, so the parts add up to the wall time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time


def seconds_since_process_start() -> float:
    """Wall time since this process started (the interpreter's own start-up included); 0 where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class Phases:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: time spent in the phases nested inside it

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.add(name, spent - self._inner.pop())
            if self._inner:
                self._inner[-1] += spent

    def reset(self) -> None:
        self.seconds.clear()
        self._inner.clear()

    def summary(self, total: float | None = None) -> str:
        """The phases in the order they first ran; with the process's `total`, what no phase covered as `other`."""
        parts = [f"{name} {s:.1f} s" for name, s in self.seconds.items() if s >= 0.05]
        marked = sum(self.seconds.values())
        if total is not None and total - marked >= 0.05:
            parts.append(f"other {total - marked:.1f} s")
        return " · ".join(parts + [f"total {max(total or 0.0, marked):.1f} s"])


@contextlib.contextmanager
def ticking(desc: str):
    """A line that counts the seconds of work that reports no progress of its own, so a wait never looks stuck."""
    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", leave=False) as bar:
        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


phases = Phases()  # one per process: the command's code marks phases, the CLI prints the line
