"""The serving engine: one thread that decodes every running request together, one token per step.

Continuous batching: a request that arrives while others decode is prefilled on its own (one forward pass of its
prompt) and then joins the running batch at the next step; a finished or abandoned request leaves it at once. The
batch's KV cache is kept left-padded: joining pads the shorter side on the left (the attention mask hides the
padding) and leaving drops rows, then the columns no row needs any more.

Requests for different adapters share a forward pass through peft's mixed-adapter batches (`adapter_names`, one
name per row, "__base__" for the base model). DoRA adapters can't be mixed that way (peft refuses), so with one of
them loaded the batch holds one model at a time and the others wait their turn.

peft routes a mixed batch by registering a hook on every LoRA layer for the length of one forward call, after two
walks over all modules: on a 30-layer model that cost more host time than the forward itself, at every decoding
step. The engine keeps the same hooks registered while its batches are mixed and removes them when a batch holds
one model (idle hooks still cost a call each); the LoRA layers receive exactly the `adapter_names` argument peft's
own hooks pass them.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import PreTrainedTokenizerBase

from ..data.examples import Example, collate
from ..model.load import cache_kwarg, output_cache

log = logging.getLogger("loratune")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class Busy(RuntimeError):
    """The queue is full: the caller answers 503 and asks the client to retry."""


@dataclass
class Sequence:
    """One completion being generated (a request with n > 1 is n of these)."""

    adapter: str
    """The adapter's name in the peft model, or BASE."""
    prompt: list[int]
    max_tokens: int
    tok: PreTrainedTokenizerBase
    """Decodes the new tokens; its EOS ends the sequence."""
    emit: Callable[[str, str | None], None]
    """Called from the engine thread with (new text, finish reason or None); must be thread-safe."""
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the decoded text already emitted."""
    cancelled: bool = False
    """Set by the server when the client went away: the engine drops the row at its next step."""
    generator: torch.Generator | None = None


@dataclass
class Batch:
    """The running rows and their shared, left-padded KV cache."""

    rows: list[Sequence]
    cache: object
    mask: torch.Tensor
    """(rows, cached tokens): 1 where a row has a real token, 0 for left padding."""
    position: torch.Tensor
    """(rows, 1): the position of each row's next token."""
    last: torch.Tensor
    """(rows,): the token each row feeds next."""


class Engine:
    def __init__(self, model: torch.nn.Module, max_batch: int = 32, max_queue: int = 256, window_s: float = 0.005):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue, self.window_s = max_batch, max_queue, window_s
        self.peft = isinstance(model, PeftModel)
        self.mixed = self.peft and not any(getattr(c, "use_dora", False) for c in model.peft_config.values())
        # The model's adapter state: adapters on or off, and which one is set. Changing it walks every module (peft's
        # set_adapter took 10 ms and disable_adapter 30 ms per call on a 30-layer model here, as long as the decode
        # step itself), so it changes only when the batch's model does, not at every step.
        self.adapters_on, self.adapter = True, model.active_adapter if self.peft else BASE
        self.routed = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self.hooks: list = []
        self.names: list[str] = []
        """The adapter name of each row of the current mixed batch, passed to every routed layer by the hooks."""
        self.waiting: deque[Sequence] = deque()
        self.ready = threading.Condition()
        self.batch: Batch | None = None
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences, all or none: Busy when the queue can't take them."""
        with self.ready:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise Busy(f"the server is busy ({len(self.waiting)} requests waiting); retry shortly")
            for s in seqs:
                if s.temperature > 0:
                    s.generator = torch.Generator(self.device)
                    if s.seed is not None:
                        s.generator.manual_seed(s.seed)
                    else:
                        s.generator.seed()
            self.waiting.extend(seqs)
            self.ready.notify()

    def _loop(self) -> None:
        while True:
            new = self._admit()
            try:
                with torch.inference_mode():
                    self._step(new)
            except Exception as e:  # a failed step ends its requests, never the server
                log.exception("generation failed")
                for s in {id(s): s for s in new + (self.batch.rows if self.batch else [])}.values():
                    s.emit(f"[generation failed: {e}]", "error")
                self.batch = None

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences into the batch: block while idle, then wait `window_s` for the ones that come
        together, so a burst of requests starts as one prefill."""
        with self.ready:
            while not self.waiting and self.batch is None:
                self.ready.wait()
            if self.batch is None:
                self.ready.wait_for(lambda: len(self.waiting) >= self.max_batch, timeout=self.window_s)
            room = self.max_batch - (len(self.batch.rows) if self.batch else 0)
            model = self.batch.rows[0].adapter if self.batch and not self.mixed else None
            taken = []
            for s in list(self.waiting):
                if len(taken) == room:
                    break
                if s.cancelled:
                    self.waiting.remove(s)
                elif self.mixed or (model or s.adapter) == s.adapter:
                    model = model or s.adapter
                    taken.append(s)
                    self.waiting.remove(s)
            return taken

    def _forward(self, rows: list[Sequence], **inputs) -> tuple[torch.Tensor, object]:
        """Next-token logits (rows, vocab), each row through its own adapter, and the KV cache."""
        names = [s.adapter for s in rows]
        mixed = self.mixed and len(set(names)) > 1  # one model in the batch: no per-row routing to pay for
        if self.peft:
            self._switch(None if mixed else names[0])
            self._route(names if mixed else None)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), output_cache(self.model, out)

    def _route(self, names: list[str] | None) -> None:
        """Per-row adapters for a mixed batch (hooks registered when batches become mixed), or none."""
        self.names = names or []
        if names and not self.hooks:
            self.hooks = [m.register_forward_pre_hook(self._pass_names, with_kwargs=True) for m in self.routed]
        elif not names:
            for hook in self.hooks:
                hook.remove()
            self.hooks = []

    def _pass_names(self, module, args, kwargs):
        return args, {**kwargs, "adapter_names": self.names}

    def _switch(self, name: str | None) -> None:
        """Put the model in the state a batch needs: `name`'s adapter, the base (BASE: adapters off), or, for None,
        a mixed batch (adapters on; peft routes each row by its adapter_names)."""
        if (name == BASE) == self.adapters_on:
            lora = self.model.base_model
            lora.disable_adapter_layers() if name == BASE else lora.enable_adapter_layers()
            self.adapters_on = name != BASE
        if name not in (None, BASE, self.adapter):
            self.model.set_adapter(name)
            self.adapter = name

    def _step(self, new: list[Sequence]) -> None:
        logits = []
        if self.batch is not None:  # one token for every running row (the cache grows in place)
            b = self.batch
            b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
            logits.append(self._forward(b.rows, input_ids=b.last[:, None], attention_mask=b.mask,
                                        position_ids=b.position, **{cache_kwarg(self.model): b.cache})[0])
            b.position = b.position + 1
        if new:  # the newcomers' prompts, then they join
            joining, new_logits = self._prefill(new)
            logits.append(new_logits)
            self.batch = join(self.batch, joining)
        tokens = sample(torch.cat(logits), self.batch.rows)
        self.batch.last = torch.tensor(tokens, device=self.device)
        self.steps += 1
        keep = [i for i, (s, t) in enumerate(zip(self.batch.rows, tokens)) if not advance(s, t)]
        if len(keep) < len(self.batch.rows):
            self.batch = drop(self.batch, keep)

    def _prefill(self, new: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        b = collate([Example(s.prompt, s.prompt, {}) for s in new], new[0].tok.pad_token_id or 0, pad_left=True)
        ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's positions start at 0
        logits, cache = self._forward(new, input_ids=ids, attention_mask=mask, position_ids=position)
        return Batch(new, cache, mask, position[:, -1:] + 1, ids[:, -1]), logits


def sample(logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
    """The next token of every row: the argmax where temperature is 0, else a draw from the row's own generator
    (nucleus-filtered at top_p), so a seeded request gives the same text whatever else shares its batch."""
    tokens = logits.argmax(-1).tolist()
    for i, s in enumerate(rows):
        if s.temperature > 0:
            probs = F.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # keeps at least the most likely token
                probs = probs.scatter(0, order[outside], 0.0)
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
    return tokens


def advance(s: Sequence, token: int) -> bool:
    """Add a token to a sequence and emit the text that is now certain; True when the sequence is finished."""
    if s.cancelled:
        return True
    finish = None
    if token == s.tok.eos_token_id:
        finish = "stop"
    else:
        s.tokens.append(token)
    text = s.tok.decode(s.tokens, skip_special_tokens=True)
    for stop in s.stop:
        at = text.find(stop, max(0, s.sent - len(stop)))
        if at != -1:
            text, finish = text[:at], "stop"
    if finish is None and len(s.tokens) >= s.max_tokens:
        finish = "length"
    end = len(text) if finish else held_back(text, s.stop)
    if end > s.sent or finish:
        s.emit(text[s.sent:end], finish)
        s.sent = max(s.sent, end)
    return finish is not None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How much of the text may be sent now: not a half-decoded character, nor what may be the start of a stop
    string (it would have to be taken back if the stop string completes)."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def join(batch: Batch | None, new: Batch) -> Batch:
    """The running batch with the new rows appended, both left-padded to the longer cache."""
    if batch is None:
        return new
    width = max(batch.mask.shape[1], new.mask.shape[1])
    for old_layer, new_layer in zip(batch.cache.layers, new.cache.layers):
        for name in ("keys", "values"):
            a, b = getattr(old_layer, name), getattr(new_layer, name)
            setattr(old_layer, name, torch.cat([left_pad(a, width, 2), left_pad(b, width, 2)]))
    return Batch(batch.rows + new.rows, batch.cache, torch.cat([left_pad(batch.mask, width, 1),
                 left_pad(new.mask, width, 1)]), torch.cat([batch.position, new.position]), batch.last)


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def drop(batch: Batch, keep: list[int]) -> Batch | None:
    """The batch without its finished rows, and without the cache columns that only they needed."""
    if not keep:
        return None
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    start = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every remaining row
    for layer in batch.cache.layers:
        layer.keys = layer.keys[index][:, :, start:]
        layer.values = layer.values[index][:, :, start:]
    return Batch([batch.rows[i] for i in keep], batch.cache, mask[:, start:], batch.position[index],
                 batch.last[index])

