"""`loratune generate`: a file of prompts in, a file of outputs out, resumable.

The output carries proof that it is ours and of what: a sidecar `.OUTPUT.loratune-generate.json` written before
the first output, with the input's SHA-256 and the settings. A re-run continues only an output whose sidecar
matches; any other existing file is refused (never truncated) unless --overwrite. In a .txt output each result is
one line: a backslash, newline or carriage return inside it is written as \\, \n or \r, so lines are never split
or merged, and the file is counted by its newline bytes alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.sources import raise_error, read_file
from ..files import atomic_write
from .generate import chat_prompt_ids, generate_batch

CHUNK = 256


def read_prompts(path: Path) -> list[tuple[str, dict]]:
    """(prompt text, record) pairs. .txt: one user message per line. .jsonl: {"messages": [...]} or {"prompt": ...}."""
    out = []
    for where, record in read_file(path, "lines", raise_error):
        if "messages" in record:
            out.append(("messages", record))
        elif "prompt" in record or "text" in record:
            out.append(("prompt" if "prompt" in record else "text", record))
        else:
            raise ValueError(f"{where}: expected a 'prompt' or 'messages' field, got {sorted(record)}")
    return out


def prompt_ids_for(kind: str, record: dict, tok: PreTrainedTokenizerBase, system: str | None) -> list[int]:
    """Chat prompts (a .txt line, or messages) go through the chat template as at training; a raw `prompt` is used as is."""
    if kind == "messages":
        return chat_prompt_ids(tok, system, record["messages"])
    if kind == "text":
        return chat_prompt_ids(tok, system, [{"role": "user", "content": record["text"]}])
    return tok(record["prompt"], add_special_tokens=False)["input_ids"]


@dataclass
class Job:
    """A checked generate job: its prompts, where they go, and how many the output already holds."""

    prompts: list[tuple[str, dict]]
    output: Path
    sidecar: Path
    proof: dict
    """What the sidecar says: the input's hash and the settings the outputs depend on."""
    done: int


def plan(input_path: str | Path, output_path: str | Path, settings: dict, overwrite: bool = False,
         chunk: int = CHUNK) -> Job:
    """Check the input and output before any model is loaded; decide where a resumed job continues."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.is_dir() or not input_path.is_file():
        raise ValueError(f"--input {input_path}: {'a folder' if input_path.is_dir() else 'no such file'}; give one "
                         f".txt or .jsonl file of prompts")
    if input_path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--input {input_path}: use a .txt (one prompt per line) or .jsonl file")
    if output_path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--output {output_path}: use a .txt (one output per line) or .jsonl file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ValueError(f"--output {output_path} is the --input file; choose another name for the outputs")
    if output_path.is_dir():
        raise ValueError(f"--output {output_path} is a folder; give a file name")
    prompts = read_prompts(input_path)
    if not prompts:
        raise ValueError(f"--input {input_path}: no prompts in it")
    sidecar = output_path.with_name(f".{output_path.name}.loratune-generate.json")
    proof = {"input": str(input_path.resolve()), "input_sha256": hashlib.sha256(input_path.read_bytes()).hexdigest(),
             "chunk": chunk, **settings}
    done = 0
    if output_path.exists() and not overwrite:
        saved = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        complete = output_path.read_bytes().count(b"\n")
        if saved != proof or complete > len(prompts):
            why = "was not written by loratune generate" if saved is None else "holds outputs of another input or settings"
            raise FileExistsError(f"--output {output_path} already exists and {why}; nothing was changed. Choose "
                                  "another --output, or pass --overwrite to replace it")
        # Restart an interrupted chunk from its beginning; chunks end at multiples of `chunk` and at the last prompt.
        done = len(prompts) if complete == len(prompts) else complete // chunk * chunk
    return Job(prompts, output_path, sidecar, proof, done)


def escape_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def generate_file(model: torch.nn.Module, tok: PreTrainedTokenizerBase, job: Job, max_new_tokens: int = 128,
                  batch_size: int = 32, system: str | None = None, seed: int = 0, **generate_kwargs) -> int:
    """Generate the job's prompts that its output lacks (.txt: a line each, .jsonl: records), appending.

    Work goes in chunks of `job.proof["chunk"]` prompts, each seeded with seed + its index, so sampled outputs don't
    depend on where a run was resumed; each chunk reaches the disk before the next starts. Returns the number of
    prompts generated by this call."""
    chunk, output = job.proof["chunk"], job.output
    if job.done == len(job.prompts):
        return 0
    atomic_write(job.sidecar, json.dumps(job.proof, indent=2))  # before the first output: the file is ours
    kept = output.read_bytes().split(b"\n")[: job.done] if output.exists() and job.done else []
    atomic_write(output, b"".join(line + b"\n" for line in kept))
    as_jsonl = output.suffix == ".jsonl"
    with output.open("a", encoding="utf-8", newline="") as out:
        for start in tqdm(range(job.done, len(job.prompts), chunk), desc="generate", unit="chunk"):
            torch.manual_seed(seed + start // chunk)
            part = job.prompts[start : start + chunk]
            texts = generate_batch(model, tok, [prompt_ids_for(kind, record, tok, system) for kind, record in part],
                                   max_new_tokens, batch_size, **dict(generate_kwargs))
            for (_, record), text in zip(part, texts):
                out.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n" if as_jsonl
                          else escape_line(text) + "\n")
            out.flush()
            os.fsync(out.fileno())
    return len(job.prompts) - job.done
