"""`loratune chat`: a multi-turn REPL over stdin/stdout."""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from .generate import chat_prompt_ids


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
        try:
            line = stdin.readline()
            line.encode("utf-8")  # a C locale reads bad bytes as lone surrogates, which the tokenizer can't take
        except UnicodeError:
            if not interactive:
                raise ValueError("stdin is not UTF-8 text; convert the input to UTF-8 (e.g. iconv -t UTF-8)") from None
            print("(that line was not valid UTF-8; type it again)", file=stdout)
            continue
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
        ids = chat_prompt_ids(tok, system, history)
        while len(ids) + max_new_tokens > context and len(history) > 1:
            history = history[2:]  # drop the oldest user/assistant exchange
            print("(history truncated to fit the model's context)", file=stdout)
            ids = chat_prompt_ids(tok, system, history)
        device = next(model.parameters()).device
        print("model> ", end="", file=stdout, flush=True)
        streamer = _Streamer(tok, stdout)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=streamer,
                                 do_sample=do_sample, **generate_kwargs)
        reply = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})


class _Streamer(TextStreamer):
    """TextStreamer that writes to a chosen stream instead of print()'s default."""

    def __init__(self, tok: PreTrainedTokenizerBase, stream: TextIO):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.stream, flush=True)
