"""loratune's log lines reach the person running it: the CLI configures logging itself; from Python, the first call
of train, evaluate, load or generate shows them on stderr unless the program set up logging of its own."""

from __future__ import annotations

import logging
import sys


def show_logs() -> None:
    log = logging.getLogger("loratune")
    if log.handlers or logging.getLogger().handlers:  # the program (or the CLI) decided where logs go
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
