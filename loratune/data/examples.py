"""Data: read records, render them through a format into (text, trained?) segments, tokenize, batch.

Every format returns segments; tokenizing each segment on its own (no special tokens added) and
concatenating means the prompt the model trains on is token-for-token the prompt it sees at
inference, and labels are exact: untrained segments become -100, trained ones keep their ids.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import DataConfig, DatasetConfig
from .cache import cache_key, load_entry, save_entry
from .demo import demo_splits
from .presets import PRESETS
from .sources import DataError, Located, local_files, read_file, read_hub

IGNORE = -100
Segments = list[tuple[str, bool]]


def get_field(record: dict, path: str, where: str) -> object:
    """Follow a field path like `answers.text[0]` into a record."""
    value: object = record
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: field '{path}' not found (record has {keys}); "
                            f"map it in the config, e.g. fields: {{prompt: your_column}}") from None
    return value


def _text_field(record: dict, name: str, fields: dict[str, str], where: str) -> str:
    value = get_field(record, fields.get(name, name), where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{fields.get(name, name)}' should be a string, got {type(value).__name__}")
    return value


def format_text(record: dict, tok: PreTrainedTokenizerBase, fields: dict[str, str], where: str) -> Segments:
    return [(_text_field(record, "text", fields, where) + tok.eos_token, True)]


def format_completion(record: dict, tok: PreTrainedTokenizerBase, fields: dict[str, str], where: str) -> Segments:
    prompt = _text_field(record, "prompt", fields, where)
    response = _text_field(record, "response", fields, where)
    return [(prompt, False), (response + tok.eos_token, True)]


ROLES = ("system", "user", "assistant")


def format_chat(record: dict, tok: PreTrainedTokenizerBase, fields: dict[str, str], where: str) -> Segments:
    messages = get_field(record, fields.get("messages", "messages"), where)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: 'messages' should be a list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i}'s content should be a string, got {type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on; every chat record needs one")
    segments: Segments = []
    done = ""
    for i, message in enumerate(messages):
        trained = message["role"] == "assistant"
        if trained:  # the generation prompt belongs to the untrained prefix, as at inference
            prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            segments.append((prompt[len(done):], False))
            done = prompt
        rendered = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not rendered.startswith(done):
            raise DataError(f"{where}: the chat template does not render turns as a growing prefix; "
                            "use format: completion with an explicit prompt instead")
        segments.append((rendered[len(done):], trained))
        done = rendered
    return [(text, trained) for text, trained in segments if text]


# Users add a format by adding a function here: record -> [(text, trained), ...].
FORMATS: dict[str, Callable[..., Segments]] = {"text": format_text, "completion": format_completion, "chat": format_chat}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    record: dict
    prompt_len: int = 0
    """Tokens before the last trained segment: the prompt for generation-based evaluation (0: none)."""
    weight: float = 1.0
    """Per-example sampling weight (from DatasetConfig.weight_field)."""


# No token is longer than this many characters in the tokenizers we train, so a text cut at max_length x this still
# holds more than max_length tokens: a huge record is cut before tokenizing and memory stays bounded by max_length.
MAX_CHARS_PER_TOKEN = 64


def tokenize(segment_lists: list[Segments], tok: PreTrainedTokenizerBase, max_length: int | None = None,
             chunk: int = 4096) -> list[tuple[list[int], list[int], int]]:
    """Per record: token ids, labels, and where the last trained segment starts (the generation prompt's length).
    All segments go through the fast tokenizer in batched calls of `chunk`, with a bar when there are several. With
    `max_length`, each text is first cut to what could matter (truncation keeps max_length tokens at most)."""
    limit = max_length * MAX_CHARS_PER_TOKEN if max_length else None
    flat = [text[:limit] for segments in segment_lists for text, _ in segments]
    starts = range(0, len(flat), chunk)
    flat_ids = iter([ids for s in tqdm(starts, desc="tokenize", unit="chunk", disable=len(starts) < 2, leave=False)
                     for ids in tok(flat[s : s + chunk], add_special_tokens=False)["input_ids"]])
    out = []
    for segments in segment_lists:
        input_ids: list[int] = []
        labels: list[int] = []
        last_trained_start = 0
        for (_, trained), ids in zip(segments, flat_ids):
            if trained:
                last_trained_start = len(input_ids)
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
        out.append((input_ids, labels, last_trained_start))
    return out


def read_records(ds: DatasetConfig, seed: int, cap: int | None, bad: Callable[[DataError], None]
                 ) -> tuple[list[Located], list[Located]]:
    """Return (train, held_out) records, each with its location, for one configured dataset."""
    if ds.hub:
        held_out = list(read_hub(ds, ds.eval_split, None)) if ds.eval_split else []
        records = list(read_hub(ds, ds.split, None if ds.eval_split is None and ds.eval_fraction else cap))
    elif ds.path == "demo":
        train, held = demo_splits(seed)
        return ([(f"demo train record {i}", r) for i, r in enumerate(train)],
                [(f"demo held-out record {i}", r) for i, r in enumerate(held)])
    else:
        records = [rec for f in local_files(ds.path) for rec in read_file(f, ds.text_mode, bad)]
        held_out = []
    if not records:
        raise DataError(f"{ds.hub or ds.path}: no records; the file is empty")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if not held_out:
        n_eval = int(round(len(records) * ds.eval_fraction))
        held_out = [records[i] for i in order[:n_eval]]
        order = order[n_eval:]
    train = [records[i] for i in order]  # shuffled under the seed, so a cap takes a random subset
    return train[:cap] if cap is not None else train, held_out


def resolve_preset(ds: DatasetConfig) -> tuple[DatasetConfig, Optional[Callable[[dict], dict]]]:
    """Fill the keys a preset sets, unless the config set them; return the config and the preset's row mapping."""
    if ds.preset is None:
        return ds, None
    if ds.preset not in PRESETS:
        raise DataError(f"unknown preset '{ds.preset}'; known: {', '.join(sorted(PRESETS))}")
    preset, default = PRESETS[ds.preset], DatasetConfig()
    filled = {"format": preset.format}
    if not ds.data_files:  # with data_files the user points at a local copy; keep their builder and splits
        filled.update(hub=preset.hub, subset=preset.subset, split=preset.split, eval_split=preset.eval_split)
    return dataclasses.replace(ds, **{k: v for k, v in filled.items() if getattr(ds, k) == getattr(default, k)}), preset.build


def mix(examples: list[Example], weight: float, seed: int, per_example: bool) -> list[Example]:
    """Resample to weight x len(examples), deterministically under the seed. Without per-example weights: whole
    copies, then a sample without replacement; with them: a weighted draw with replacement."""
    count = int(round(weight * len(examples)))
    rng = random.Random(seed)
    if per_example:
        return rng.choices(examples, weights=[e.weight for e in examples], k=count)
    copies, extra = divmod(count, len(examples)) if examples else (0, 0)
    return examples * copies + rng.sample(examples, extra)


def build_examples(records: list[Located], ds: DatasetConfig, tok: PreTrainedTokenizerBase, max_length: int,
                   truncation: str, bad: Callable[[DataError], None] = None,
                   build: Optional[Callable[[dict], dict]] = None) -> tuple[list[Example], dict]:
    """Tokenize records; returns examples and counts of what was truncated or dropped."""
    if ds.format not in FORMATS:
        raise DataError(f"dataset {ds.path}: unknown format '{ds.format}'; known: {sorted(FORMATS)}")
    formatter = FORMATS[ds.format]
    rendered = []  # (record, weight, segments)
    for where, record in records:
        try:
            weight = _example_weight(record, ds.weight_field, where)
            record = _apply_build(build, record, ds.preset, where)
            rendered.append((record, weight, formatter(record, tok, ds.fields, where)))
        except DataError as e:
            if bad is None:
                raise
            bad(e)
    examples, stats = [], {"truncated": 0, "dropped": 0}
    tokenized = tokenize([segments for _, _, segments in rendered], tok, max_length)
    for (record, weight, _), (input_ids, labels, prompt_len) in zip(rendered, tokenized):
        if len(input_ids) > max_length:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            stats["dropped"] += 1
            continue
        examples.append(Example(input_ids, labels, record, prompt_len if prompt_len < len(input_ids) else 0, weight))
    return examples, stats


def _apply_build(build: Optional[Callable[[dict], dict]], record: dict, preset: Optional[str], where: str) -> dict:
    if build is None:
        return record
    try:
        return build(record)
    except (KeyError, IndexError, TypeError) as e:
        raise DataError(f"{where}: preset '{preset}' could not read this row ({type(e).__name__}: {e}); "
                        f"it has columns {sorted(record)}") from None


def _example_weight(record: dict, field: Optional[str], where: str) -> float:
    if field is None:
        return 1.0
    value = get_field(record, field, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise DataError(f"{where}: weight field '{field}' should be a non-negative number, got {value!r}")
    return float(value)


def dataset_examples(ds: DatasetConfig, build: Optional[Callable[[dict], dict]], cfg: DataConfig,
                     tok: PreTrainedTokenizerBase, seed: int) -> dict:
    """Tokenized train and held-out examples of one dataset, from the cache when its inputs are unchanged."""
    skipped: list[str] = []

    def bad(error: DataError) -> None:
        if cfg.on_bad_record == "error":
            raise error
        skipped.append(str(error))

    files = _cacheable_files(ds)
    key = cache_key(ds, cfg, files, tok, seed) if files is not None else None
    entry = load_entry(cfg.cache_dir, key) if key else None
    if entry is not None:
        return {**entry, "train": [Example(*e) for e in entry["train"]], "held_out": [Example(*e) for e in entry["held_out"]],
                "cached": True}
    cap = ds.max_samples if ds.max_samples is not None else cfg.max_samples_per_dataset
    train_records, eval_records = read_records(ds, seed, cap, bad)
    train, stats = build_examples(train_records, ds, tok, cfg.max_length, cfg.truncation, bad, build)
    held_out, _ = build_examples(eval_records, ds, tok, cfg.max_length, cfg.truncation, bad, build)
    for e in held_out:
        e.record.setdefault("dataset", ds.preset or ds.hub or ds.path)
    entry = {"train": train, "held_out": held_out, "stats": stats, "skipped": skipped}
    if key:
        as_lists = {k: [dataclasses.astuple(e) for e in entry[k]] for k in ("train", "held_out")}
        save_entry(cfg.cache_dir, key, {**entry, **as_lists})
    return {**entry, "cached": False}


def _cacheable_files(ds: DatasetConfig) -> Optional[list[Path]]:
    """The files whose content the tokens depend on, or None when that can't be known (a remote hub dataset)."""
    if ds.hub:
        return [Path(f) for f in ds.data_files] if ds.data_files and all(Path(f).is_file() for f in ds.data_files) else None
    if ds.path == "demo":
        return [Path(demo_splits.__code__.co_filename)]
    return local_files(ds.path)


def load_data(cfg: DataConfig, tok: PreTrainedTokenizerBase, seed: int,
              require_train: bool = True) -> tuple[list[Example], list[Example], list[str]]:
    """Build the training mix and the held-out examples of every configured dataset; also return report lines."""
    if cfg.truncation not in ("truncate", "drop"):
        raise DataError(f"data.truncation: '{cfg.truncation}' should be truncate or drop")
    if cfg.on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record: '{cfg.on_bad_record}' should be error or skip")
    train, held_out, report = [], [], []
    for index, ds in enumerate(cfg.datasets):
        ds, build = resolve_preset(ds)
        got = dataset_examples(ds, build, cfg, tok, seed)
        tr, ev, stats, skipped = got["train"], got["held_out"], got["stats"], got["skipped"]
        mixed = mix(tr, ds.weight, seed + index, per_example=ds.weight_field is not None)
        n_tokens = sum(len(e.input_ids) for e in mixed)
        n_trained = sum(sum(label != IGNORE for label in e.labels) for e in mixed)
        report.append(f"{ds.preset or ds.hub or ds.path}: {len(tr)} train / {len(ev)} held-out examples, weight {ds.weight:g} -> "
                      f"{len(mixed)} in the mix, {n_tokens:,} tokens ({100 * n_trained / max(n_tokens, 1):.0f}% trained), "
                      f"truncated {stats['truncated']}, dropped {stats['dropped']}, skipped {len(skipped)} bad records"
                      + (" (tokenized cache)" if got["cached"] else ""))
        if skipped:
            report.append(f"  first skipped: {skipped[0]}")
        train += mixed
        held_out += ev
    if require_train and not train:
        raise DataError("no training examples after tokenization; check data.datasets and data.max_length")
    return train, held_out, report


def collate(examples: list[Example], pad_id: int, pad_left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch. Labels are padded by position with -100, so a pad id equal to EOS never hides EOS."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(width - n, width) if pad_left else slice(0, n)
        ids[row, cols] = torch.tensor(e.input_ids)
        labels[row, cols] = torch.tensor(e.labels)
        mask[row, cols] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
