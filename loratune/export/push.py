"""`loratune push RUN_DIR REPO_ID`: the adapter, tokenizer, model card and config to a hub repository, through
huggingface_hub unchanged (create_repo + upload_folder). Checkpoints, metrics and caches stay home."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from .. import hub
from ..runs import RunError, check_weights, load_run_config

# What a hub repository of a run holds: enough for peft, transformers and loratune to use it.
UPLOAD = ["adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json",
          "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "README.md",
          "config.yaml", "final_metrics.json"]


def files_to_push(run_dir: Path) -> list[str]:
    """The run's files that push uploads, checked before anything goes out."""
    load_run_config(run_dir)
    check_weights(run_dir)
    names = sorted(p.name for p in run_dir.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, u) for u in UPLOAD))
    if not any(n in names for n in ("adapter_model.safetensors", "model.safetensors")):
        raise RunError(f"{run_dir} has no final weights yet (the run did not finish); finish it with "
                       f"loratune train --resume {run_dir}")
    return names


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (or reuse) the repository and upload the run's files; returns the repository's URL."""
    from huggingface_hub import HfApi, get_token

    run_dir = Path(run_dir)
    names = files_to_push(run_dir)
    if get_token() is None:
        raise RunError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN, then push again")
    problem = None if hub.offline_mode() else hub.unreachable()
    if hub.offline_mode() or problem:
        raise RunError(f"the Hugging Face hub can't be reached ({problem or 'offline mode is set'}); nothing was "
                       "uploaded")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), allow_patterns=names,
                      commit_message=f"loratune push of {run_dir.name}")
    return str(url)
