"""Inference: load a run, generate in left-padded batches, chat in a REPL."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TextStreamer

from ..data.examples import Example, collate
from ..data.sources import local_files, raise_error, read_file
from ..device import pick_device
from ..model.load import load_adapter, load_base_model, load_tokenizer
from ..runs import load_run_config


def load(run_dir: str | Path, device: str = "auto", merge_adapter: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) of a run, in eval mode and ready to generate: the base with the run's adapter,
    or for `method: full` the fine-tuned model itself. `merge_adapter` folds the adapter into the base weights:
    generation then runs no adapter kernels (faster), at the cost of rounding the sum to the weights' dtype, so
    evaluation keeps the adapter separate, exactly as trained."""
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(cfg.model, source=str(run_dir))
    if cfg.method == "full":
        return load_base_model(dataclasses.replace(cfg.model, name=str(run_dir)), pick_device(device)).eval(), tok
    model = load_adapter(load_base_model(cfg.model, pick_device(device)), run_dir)
    return (model.merge_and_unload() if merge_adapter else model).eval(), tok


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_id: int, pad_id: int, check_every: int = 8) -> torch.Tensor:
    """Greedy continuation of a left-padded batch with the KV cache: (batch, <= max_new_tokens) new token ids.

    The same tokens as `generate(do_sample=False)`, without its per-token host sync: whether every row has
    finished is asked only every `check_every` tokens, so the GPU queue never drains between tokens.
    Finished rows continue with `pad_id`.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's positions start at 0
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for i in range(max_new_tokens):
        token = torch.where(finished, pad_id, out.logits[:, -1].argmax(-1))
        new_tokens.append(token)
        finished |= token == eos_id
        if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and bool(finished.all())):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    return torch.stack(new_tokens, dim=1)


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, batch_size: int = 16, **generate_kwargs) -> list[str]:
    """Greedy (or as `generate_kwargs` say, through `generate`) completions of token-id prompts, in left-padded batches."""
    device = next(model.parameters()).device
    do_sample = generate_kwargs.pop("do_sample", False)  # once, not per batch: every batch samples alike
    # Sorting by length keeps padding small; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([Example(prompts[i], prompts[i], {}) for i in idx], tok.pad_token_id, pad_left=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if do_sample or generate_kwargs:
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, do_sample=do_sample,
                                 **generate_kwargs)[:, ids.shape[1]:]
        else:
            new = greedy_decode(model, ids, mask, max_new_tokens, tok.eos_token_id, tok.pad_token_id)
        for row, i in enumerate(idx):
            texts[i] = tok.decode(new[row], skip_special_tokens=True).strip()
    return [texts[i] for i in range(len(prompts))]


def chat_loop(model: torch.nn.Module, tok: PreTrainedTokenizerBase, system: str | None = None,
              max_new_tokens: int = 256, stdin: TextIO | None = None, stdout: TextIO | None = None,
              **generate_kwargs) -> None:
    """A multi-turn REPL. `exit`, `quit` or end of input leave; `/reset` clears the history."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout  # looked up per call, so redirection is honoured
    interactive = stdin.isatty()
    do_sample = generate_kwargs.pop("do_sample", False)  # once, not per turn: every turn samples alike
    context = getattr(model.config, "max_position_embeddings", 2048)
    history: list[dict] = []
    if interactive:
        print("Chat with the model. /reset clears the history; exit, quit or Ctrl-D leaves.", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("exit", "quit"):
            break
        if not text:
            continue
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=stdout)
            continue
        history.append({"role": "user", "content": text})
        ids = _prompt_ids(tok, system, history)
        while len(ids) + max_new_tokens > context and len(history) > 1:
            history = history[2:]  # drop the oldest user/assistant exchange
            print("(history truncated to fit the model's context)", file=stdout)
            ids = _prompt_ids(tok, system, history)
        device = next(model.parameters()).device
        print("model> ", end="", file=stdout, flush=True)
        streamer = _Streamer(tok, stdout)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=streamer,
                                 do_sample=do_sample, **generate_kwargs)
        reply = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})


def _prompt_ids(tok: PreTrainedTokenizerBase, system: str | None, history: list[dict]) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + history
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


class _Streamer(TextStreamer):
    """TextStreamer that writes to a chosen stream instead of print()'s default."""

    def __init__(self, tok: PreTrainedTokenizerBase, stream: TextIO):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.stream, flush=True)


def read_prompts(path: Path) -> list[tuple[str, dict]]:
    """(prompt text, record) pairs. .txt: one user message per line. .jsonl: {"messages": [...]} or {"prompt": ...}."""
    out = []
    for where, record in read_file(local_files(str(path))[0], "lines", raise_error):
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
        return _prompt_ids(tok, system, record["messages"])
    if kind == "text":
        return _prompt_ids(tok, system, [{"role": "user", "content": record["text"]}])
    return tok(record["prompt"], add_special_tokens=False)["input_ids"]


def generate_file(model: torch.nn.Module, tok: PreTrainedTokenizerBase, input_path: str | Path, output_path: str | Path,
                  max_new_tokens: int = 128, batch_size: int = 32, system: str | None = None, seed: int = 0,
                  chunk: int = 256, **generate_kwargs) -> int:
    """Generate for every prompt of `input_path` into `output_path` (.txt: a line each, .jsonl: records), appending.

    Resumable: results already in the output are kept and skipped. Work goes in chunks of `chunk` prompts, each
    seeded with seed + its index, so sampled outputs don't depend on where a run was resumed. Returns the number
    of prompts generated by this call."""
    input_path, output_path = Path(input_path), Path(output_path)
    prompts = read_prompts(input_path)
    lines = output_path.read_text(encoding="utf-8").split("\n") if output_path.is_file() else []
    complete = lines[:-1]  # text after the last newline is a line torn by an interrupted run
    # Restart an interrupted chunk from its beginning; chunks end at multiples of `chunk` and at the last prompt.
    done = len(prompts) if len(complete) >= len(prompts) else len(complete) // chunk * chunk
    output_path.write_text("".join(line + "\n" for line in complete[:done]), encoding="utf-8")
    as_jsonl = output_path.suffix == ".jsonl"
    with output_path.open("a", encoding="utf-8") as out:
        for start in range(done, len(prompts), chunk):
            torch.manual_seed(seed + start // chunk)
            part = prompts[start : start + chunk]
            texts = generate_batch(model, tok, [prompt_ids_for(kind, record, tok, system) for kind, record in part],
                                   max_new_tokens, batch_size, **dict(generate_kwargs))
            for (_, record), text in zip(part, texts):
                out.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n" if as_jsonl
                          else text.replace("\n", "\\n") + "\n")
            out.flush()
    return len(prompts) - done


def merge(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the run's adapter into its base and save a plain transformers model (safetensors) with the tokenizer."""
    model, tok = load(run_dir, device="cpu")
    if not isinstance(model, PeftModel):
        raise ValueError(f"{run_dir} holds a fully fine-tuned model already; load it with from_pretrained({run_dir!s})")
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already holds files; choose an empty or new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir
