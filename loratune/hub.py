"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before a model or dataset is fetched from it:
offline, the libraries would otherwise retry for most of a minute before failing."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
OFFLINE_CHOICES = ("model.name=smollm2-135m-instruct (embedded, no network), a local folder written by "
                   "save_pretrained, a .gguf file, or, for what is already in your HF cache, HF_HUB_OFFLINE=1")


def offline_mode() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def unreachable(endpoint: str | None = None) -> str | None:
    """None when the hub answers a TCP connection within PROBE_SECONDS, else why not."""
    from huggingface_hub import constants

    url = urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS):
            return None
    except OSError as e:
        return f"{url.scheme}://{url.netloc} did not answer ({e.strerror or type(e).__name__})"


def cached(repo_id: str, revision: str | None = None) -> bool:
    """The model's config is in the local HF cache (so it can load with local_files_only)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False
