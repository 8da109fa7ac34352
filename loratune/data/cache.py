"""An on-disk cache of tokenized datasets, so a second run with the same data starts at once.

The key covers everything the examples depend on: the dataset's config, every data setting but the few listed in
NOT_IN_KEY (derived from the config, so a new setting is in the key unless someone decides otherwise), the content
of its local files (or of the demo generator), the tokenizer and its chat template, and the seed (it fixes the
held-out split and the capped subset). Remote hub datasets without data_files are not cached here (their content can't be hashed
before downloading; `datasets` keeps its own download cache). Entries are JSON, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from transformers import PreTrainedTokenizerBase

from ..config import DataConfig, DatasetConfig
from ..files import atomic_write

CACHE_VERSION = 2

# Data settings that don't change a dataset's examples: the other datasets (each has its own entry), where the cache
# lives, and packing (rows are built from the examples after the cache).
NOT_IN_KEY = {"datasets", "cache_dir", "packing"}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(ds: DatasetConfig, data: DataConfig, files: list[Path], tok: PreTrainedTokenizerBase, seed: int) -> str:
    tokenizer = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(tok.get_vocab())
    settings = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in NOT_IN_KEY}
    parts = {"version": CACHE_VERSION, "dataset": dataclasses.asdict(ds), "data": settings, "seed": seed,
             "files": [(str(f), _file_digest(f)) for f in files],
             "tokenizer": hashlib.sha256(tokenizer.encode()).hexdigest(), "template": tok.chat_template,
             "specials": [tok.eos_token, tok.pad_token, tok.bos_token]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_entry(cache_dir: Optional[str], key: str) -> Optional[dict]:
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # missing or unreadable: just tokenize again
        return None


def save_entry(cache_dir: Optional[str], key: str, entry: dict) -> None:
    if cache_dir is None:
        return
    try:
        text = json.dumps(entry)
    except (TypeError, ValueError):  # records with values JSON can't hold (timestamps, bytes): don't cache
        return
    folder = Path(cache_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{key}.json", text)
