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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.sources import raise_error, read_file
from ..files import atomic_write
from .generate import chat_prompt_ids, generate_batch
from .load import load

CHUNK = 256
log = logging.getLogger("loratune")


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
    chunk: int | None
    """Prompts per seeded chunk when sampling (fixed, so a resumed run draws the same numbers); None for greedy
    runs, whose outputs depend on nothing but the prompt: they go a batch at a time and resume at any line."""


def plan(input_path: str | Path, output_path: str | Path, settings: dict, overwrite: bool = False,
         sampling: bool = False, chunk: int = CHUNK) -> Job:
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
    chunk = chunk if sampling else None
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
        # Sampling restarts an interrupted chunk from its beginning (chunks end at multiples of `chunk`).
        done = complete if chunk is None or complete == len(prompts) else complete // chunk * chunk
    return Job(prompts, output_path, sidecar, proof, done, chunk)


def escape_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def generate_file(model: torch.nn.Module, tok: PreTrainedTokenizerBase, job: Job, max_new_tokens: int = 128,
                  batch_size: int | None = None, system: str | None = None, seed: int = 0, **generate_kwargs) -> int:
    """Generate the job's prompts that its output lacks (.txt: a line each, .jsonl: records), appending.

    Sampled work goes in chunks of `job.chunk` prompts, each seeded with seed + its index, so outputs don't depend on
    where a run was resumed; greedy work goes at least a batch at a time. Each chunk reaches the disk before the next
    starts. `batch_size=None` picks the batch from the free GPU memory (32 on the CPU). Returns the number of prompts
    generated by this call."""
    output = job.output
    if job.done == len(job.prompts):
        return 0
    ids = [prompt_ids_for(kind, record, tok, system) for kind, record in job.prompts]
    if batch_size is None:
        batch_size = pick_batch_size(model, ids[job.done:], max_new_tokens, generate_kwargs.get("num_beams", 1))
    chunk = job.chunk or max(CHUNK, batch_size)
    atomic_write(job.sidecar, json.dumps(job.proof, indent=2))  # before the first output: the file is ours
    kept = output.read_bytes().split(b"\n")[: job.done] if output.exists() and job.done else []
    atomic_write(output, b"".join(line + b"\n" for line in kept))
    as_jsonl = output.suffix == ".jsonl"
    bar = tqdm(total=len(job.prompts), initial=job.done, desc="prompts", unit="prompt", dynamic_ncols=True)
    with output.open("a", encoding="utf-8", newline="") as out, bar:
        for start in range(job.done, len(job.prompts), chunk):
            torch.manual_seed(seed + start // chunk)
            part = job.prompts[start : start + chunk]
            texts = generate_batch(model, tok, ids[start : start + chunk], max_new_tokens, batch_size,
                                   **dict(generate_kwargs))
            for (_, record), text in zip(part, texts):
                out.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n" if as_jsonl
                          else escape_line(text) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(part))
    return len(job.prompts) - job.done


def generation_bytes(config, width: int, length: int) -> int:
    """GPU memory one sequence of `length` tokens needs while generating with weights of `width` bytes: keys and
    values of every layer (twice: the cache grows by concatenation), one layer's prefill activations (MLP and
    attention projections) and the fp32 logits of one position."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * 2 * c.num_hidden_layers * heads * head_dim * length * width
    prefill = length * (3 * (getattr(c, "intermediate_size", None) or 4 * c.hidden_size) + 6 * c.hidden_size) * width
    return kv + prefill + 2 * 4 * c.vocab_size


def pick_batch_size(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1,
                    share: float = 0.5) -> int:
    """The largest generation batch that fits in `share` of the free GPU memory, at most every prompt at once
    (32 on the CPU). Logged, so the user knows what was picked and how to change it."""
    weight = next(model.parameters())
    if weight.device.type != "cuda" or not prompts:
        return 32
    longest = max(len(p) for p in prompts) + max_new_tokens
    per_sequence = generation_bytes(model.config, weight.element_size(), longest) * num_beams
    free, _ = torch.cuda.mem_get_info(weight.device)
    batch = max(1, min(len(prompts), int(share * free // per_sequence)))
    log.info("generation batch size %d: %.1f GiB of the %.1f GiB free on the GPU (--batch_size sets it)",
             batch, batch * per_sequence / 2**30, free / 2**30)
    return batch


def generate(run: str | Path, prompts: list[str], max_new_tokens: int = 128, batch_size: int | None = None,
             system: str | None = None, device: str = "auto", **generate_kwargs) -> list[str]:
    """Answers of a run (or PEFT adapter folder) to chat prompts, in order, as `loratune generate` gives them:
    each prompt is a user message rendered with the run's chat template. Greedy unless `do_sample=True`."""
    model, tok = load(run, device, merge_adapter=True)
    ids = [prompt_ids_for("text", {"text": p}, tok, system) for p in prompts]
    batch_size = batch_size or pick_batch_size(model, ids, max_new_tokens, generate_kwargs.get("num_beams", 1))
    return generate_batch(model, tok, ids, max_new_tokens, batch_size, **generate_kwargs)
