"""Inference: load a run, generate in left-padded batches, chat in a REPL."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.examples import Example, collate
from ..model.load import cache_kwarg, output_cache
from ..model.loss import MIN_SHARED_PREFIX


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_id: int, pad_id: int, check_every: int | None = None, bar: tqdm | None = None,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuation of a left-padded batch with the KV cache: (batch, <= max_new_tokens) new token ids.

    The same tokens as `generate(do_sample=False)`, without its per-token host sync: which rows have finished is
    asked only every `check_every` tokens (default: every token on the CPU, where asking is free, every 8 on a GPU,
    so its queue never drains between tokens). Finished rows leave the batch then, cache included: the rows still
    going cost less per token (on the CPU, compute is proportional to rows). Finished rows are filled with `pad_id`.
    `bar` advances by one per decoding step (host-side only, no sync). `prefix`: token ids that come before every
    row's own tokens, run once for the whole batch and shared through the cache (a chat template's system prompt is
    most of a short prompt).
    """
    check_every = check_every or (1 if input_ids.device.type == "cpu" else 8)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's positions start at 0
    shared = {}
    if prefix is not None:
        cache = output_cache(model, model(input_ids=prefix[None], use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(len(input_ids))
        # The rows' padding now sits between the prefix and their own tokens: masked, and skipped by the positions.
        attention_mask = torch.cat([attention_mask.new_ones(len(input_ids), len(prefix)), attention_mask], dim=1)
        positions, shared = positions + len(prefix), {cache_kwarg(model): cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **shared)
    cache, next_position = output_cache(model, out), positions[:, -1:] + 1
    new_tokens = input_ids.new_full((len(input_ids), max_new_tokens), pad_id)
    rows = torch.arange(len(input_ids), device=input_ids.device)  # the batch rows still decoding
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = torch.where(finished, pad_id, out.logits[:, -1].argmax(-1))
        new_tokens[rows, i] = token
        finished |= token == eos_id
        if bar is not None:
            bar.update(1)
        if i + 1 == max_new_tokens:
            break
        if (i + 1) % check_every == 0 and bool(finished.any()):
            if bool(finished.all()):
                break
            going = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(going)
            rows, token, finished = rows[going], token[going], finished[going]
            attention_mask, next_position = attention_mask[going], next_position[going]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{cache_kwarg(model): cache})
        next_position = next_position + 1
    return new_tokens[:, : i + 1]


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Leading tokens every prompt shares, each keeping at least one of its own (its last position's logits come
    from the batch's forward); 0 where fewer than MIN_SHARED_PREFIX or only one prompt. (Training's
    loss.shared_prefix_len also stops before the first trained token; prompts have none.)"""
    if len(prompts) < 2:
        return 0
    first, most = prompts[0], min(len(p) for p in prompts) - 1
    n = next((i for i in range(most) if any(p[i] != first[i] for p in prompts)), most)
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, batch_size: int = 16, desc: str = "generate", **generate_kwargs) -> list[str]:
    """Greedy (or as `generate_kwargs` say, through `generate`) completions of token-id prompts, in left-padded batches.
    The bar counts decoding steps of all batches (a batch whose rows all stopped early skips the rest of its steps)."""
    device = next(model.parameters()).device
    do_sample = generate_kwargs.pop("do_sample", False)  # once, not per batch: every batch samples alike
    # Sorting by length keeps padding small; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    n_batches = -(-len(order) // batch_size)
    bar = tqdm(total=n_batches * max_new_tokens, desc=desc, unit="tok step", leave=False, dynamic_ncols=True)
    sampled = do_sample or bool(generate_kwargs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        shared = 0 if sampled else common_prefix_len([prompts[i] for i in idx])
        batch = collate([Example(prompts[i][shared:], prompts[i][shared:], {}) for i in idx], tok.pad_token_id,
                        pad_left=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if sampled:
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, do_sample=do_sample,
                                 **generate_kwargs)[:, ids.shape[1]:]
        else:
            prefix = torch.tensor(prompts[idx[0]][:shared], device=device) if shared else None
            new = greedy_decode(model, ids, mask, max_new_tokens, tok.eos_token_id, tok.pad_token_id, bar=bar,
                                prefix=prefix)
        bar.update(start // batch_size * max_new_tokens + max_new_tokens - bar.n)  # this batch's steps, all done
        for row, i in enumerate(idx):
            texts[i] = tok.decode(new[row], skip_special_tokens=True).strip()
    bar.close()
    return [texts[i] for i in range(len(prompts))]


def chat_prompt_ids(tok: PreTrainedTokenizerBase, system: str | None, history: list[dict]) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + history
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]
