"""Inference: load a run, generate in left-padded batches, chat in a REPL."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TextStreamer

from .config import Config, load_config
from .data import Example, collate
from .model import load_adapter, load_base_model, load_tokenizer
from .train import pick_device


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a loratune run directory (no config.yaml); pass the output_dir of `loratune train`")
    return load_config(path)


def load(run_dir: str | Path, device: str = "auto") -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Return (model with the run's adapter, tokenizer), in eval mode and ready to generate."""
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(cfg.model, source=str(run_dir))
    model = load_adapter(load_base_model(cfg.model, pick_device(device)), run_dir)
    return model.eval(), tok


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, batch_size: int = 16, **generate_kwargs) -> list[str]:
    """Greedy (or as `generate_kwargs` say) completions of token-id prompts, in left-padded batches."""
    device = next(model.parameters()).device
    do_sample = generate_kwargs.pop("do_sample", False)  # once, not per batch: every batch samples alike
    # Sorting by length keeps padding small; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([Example(prompts[i], prompts[i], {}) for i in idx], tok.pad_token_id, pad_left=True)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            do_sample=do_sample, **generate_kwargs,
        )
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            texts[i] = tok.decode(generated[row, width:], skip_special_tokens=True).strip()
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
