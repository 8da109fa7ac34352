"""`loratune serve`: check the runs, load them once, and answer HTTP until Ctrl-C."""

from __future__ import annotations

import logging
import socket
import sys

from ..timing import phases
from .app import create_app
from .engine import Engine
from .models import load_served, parse_specs

log = logging.getLogger("loratune")


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, max_queue: int = 256, max_tokens: int = 2048, device: str = "auto",
          trust_remote_code: bool = False, base: str | None = None) -> int:
    import uvicorn

    runs = parse_specs(specs, trust_remote_code, base)  # every run checked before the model loads
    listener = bind(host, port)  # a port in use is an error now, not after a minute of loading
    with phases("model"):
        served = load_served(runs, device)
    engine = Engine(served.model, max_batch=max_batch, max_queue=max_queue)
    app = create_app(served, engine, api_key=api_key, max_tokens_limit=max_tokens)
    address = f"http://{host if ':' not in host else f'[{host}]'}:{listener.getsockname()[1]}/v1"
    print(f"serving {', '.join(served.adapters)} at {address}  (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this machine can use the models", host)
    print(f"time: {phases.summary()}", file=sys.stderr, flush=True)  # the start-up's; serving runs until stopped
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"can't listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(128)
    return sock
