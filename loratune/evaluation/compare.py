"""`loratune eval`: token-weighted perplexity and generation metrics of the base model and runs, side by side."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import Config, DatasetConfig
from ..data.examples import IGNORE, Example, collate, load_data
from ..device import pick_device
from ..files import atomic_write
from ..inference.generate import generate_batch
from ..inference.load import load
from ..logs import show_logs
from ..model.load import load_base_model, load_tokenizer
from ..model.loss import sum_token_nll
from ..runs import check_weights, is_peft_folder, load_run_config, refuse_overwriting_in_a_peft_folder, tokenizer_source
from ..timing import phases
from .metrics import METRICS, reference_of, score_generations

log = logging.getLogger("loratune")


@torch.no_grad()
def nll_and_count(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Summed NLL and count of the trained tokens of `examples` (perplexity = exp(nll / count))."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="loss", unit="batch", leave=False, dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        nll, n = sum_token_nll(model, batch, share_prefix=not model.training)  # no dropout: the same numbers
        total, count = total + nll.item(), count + n
    return total, count


def group_of(example: Example) -> str:
    """Results are reported per dataset, and per task within it where records carry a `task` field."""
    dataset, task = example.record.get("dataset", "data"), example.record.get("task")
    return f"{dataset} / {task}" if task else dataset


def windows(example: Example, max_length: int, stride: int) -> list[Example]:
    """Split a long example for sliding-window perplexity: each window scores only tokens no earlier window scored,
    with up to max_length - stride tokens of earlier context before them."""
    ids, labels = example.input_ids, example.labels
    if len(ids) <= max_length:
        return [example]
    out, scored_until = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        fresh = end - scored_until
        out.append(Example(ids[begin:end], [IGNORE] * (end - begin - fresh) + labels[end - fresh : end], example.record))
        scored_until = end
        if end == len(ids):
            break
    return out


def eval_examples(cfg: Config, tok: PreTrainedTokenizerBase, file: Optional[Path], file_format: Optional[str],
                  untruncated: bool) -> list[Example]:
    """The run's held-out split, or every record of `file`; untruncated for sliding-window perplexity.

    A file is read like the run's first dataset (format, fields, preset: the same column layout) unless
    `file_format` names another format, which then uses its standard field names."""
    data = cfg.data
    if file is not None:
        like = data.datasets[0] if data.datasets else DatasetConfig()  # a PEFT folder has no datasets
        ds = DatasetConfig(path=str(file), eval_fraction=1.0, format=file_format or like.format,
                           fields=like.fields if file_format is None else {})
        if like.preset and file_format is None:  # a local file in the preset's layout, through the datasets builder
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
            ds = DatasetConfig(preset=like.preset, hub=builder.get(file.suffix, "json"), data_files=[str(file)],
                               eval_fraction=1.0)
        data = dataclasses.replace(data, datasets=[ds], max_samples_per_dataset=None)
    if untruncated:
        data = dataclasses.replace(data, max_length=10**9)
    _, held_out, _ = load_data(data, tok, cfg.train.seed, require_train=False)
    if not held_out:
        raise ValueError("nothing to evaluate: the run's data has no held-out split (set data.datasets[].eval_fraction "
                         "or eval_split) and no --file was given")
    return held_out


def _models(run_dirs: list[Path], cfg: Config, device: str, trust_remote_code: bool, base: Optional[str]):
    """(column name, model) for the base and then each run, one loaded at a time to bound memory."""
    with phases("model"):
        first, _ = load(run_dirs[0], device, trust_remote_code=trust_remote_code, base=base)
    if isinstance(first, PeftModel):  # an adapter switched off is the base, without loading it twice
        with first.disable_adapter():
            yield "base", first
    else:
        with phases("model"):
            base = load_base_model(cfg.model, pick_device(device)).eval()
        yield "base", base
    yield str(run_dirs[0]), first
    del first
    for run_dir in run_dirs[1:]:
        with phases("model"):
            model = load(run_dir, device, trust_remote_code=trust_remote_code, base=base)[0]
        yield str(run_dir), model


def evaluate(run_dirs: str | Path | list, device: str = "auto", samples: int = 3, file: str | Path | None = None,
             file_format: Optional[str] = None, max_length: Optional[int] = None, stride: Optional[int] = None,
             out: str | Path | None = None, trust_remote_code: bool = False, base: Optional[str] = None) -> dict:
    """Score the base model and each run side by side, overall and per dataset; write JSON and print a table.

    Data: the first run's held-out split, or every record of `file`. With max_length (and stride), long examples
    get sliding-window perplexity instead of being truncated. All runs must share their base model.
    """
    show_logs()
    run_dirs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if file is not None and not Path(file).is_file():
        raise FileNotFoundError(f"--file {file}: no such file")
    for name, value in (("--max_length", max_length), ("--stride", stride)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value}: should be 1 or more")
    cfg = load_run_config(run_dirs[0], trust_remote_code, base)
    if out is None:  # decided before the slow work: in a PEFT folder from elsewhere, nothing of the user's is replaced
        out = run_dirs[0] / ("eval.json" if file is None else f"eval-{Path(file).stem}.json")
        refuse_overwriting_in_a_peft_folder(run_dirs[0], out)
    if file is None and is_peft_folder(run_dirs[0]):
        raise ValueError(f"{run_dirs[0]} is a PEFT adapter without loratune's config, so it has no held-out data: "
                         "pass --file FILE to say what to evaluate on")
    for run_dir in run_dirs:
        check_weights(run_dir)
    for other in run_dirs[1:]:
        if load_run_config(other, trust_remote_code, base).model != cfg.model:
            raise ValueError(f"{other} was trained on another base model than {run_dirs[0]}; compare runs of one base")
    with phases("data"):
        tok = load_tokenizer(cfg.model, source=tokenizer_source(run_dirs[0]))
        held_out = eval_examples(cfg, tok, Path(file) if file else None, file_format, max_length is not None)
    scored = [w for e in held_out for w in windows(e, max_length, stride or max_length)] if max_length else held_out
    generative = [e for e in held_out if e.prompt_len > 0]
    groups = defaultdict(list)
    for e in scored:
        groups[group_of(e)].append(e)
    results: dict = {"columns": [], "data": str(file) if file else "held-out split"}
    for name, model in _models(run_dirs, cfg, device, trust_remote_code, base):
        log.info("scoring %s: loss on %d examples, then %d generations", name, len(scored), len(generative))
        with phases("loss"):
            sums = {g: nll_and_count(model, members, tok.pad_token_id) for g, members in sorted(groups.items())}
        with phases("generation"):
            predictions = generate_batch(model, tok, [e.input_ids[: e.prompt_len] for e in generative],
                                         cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generate ({Path(name).name})")
        row = {"perplexity": math.exp(sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1))}
        if generative:
            row.update(score_generations(generative, predictions, tok))
        row["by_group"] = {}
        for g, (total, count) in sums.items():
            pairs = [(e, p) for e, p in zip(generative, predictions) if group_of(e) == g]
            row["by_group"][g] = {"perplexity": math.exp(total / max(count, 1)),
                                  **(score_generations([e for e, _ in pairs], [p for _, p in pairs], tok) if pairs else {})}
        row["predictions"] = predictions
        results["columns"].append(name)
        results[name] = row
    results["examples"] = [{"prompt": tok.decode(e.input_ids[: e.prompt_len], skip_special_tokens=True),
                            "reference": reference_of(e, tok)} for e in generative]
    atomic_write(out, json.dumps(results, indent=2))
    print(format_table(results))
    print(format_samples(results, samples))
    return results


def column_names(results: dict) -> list[str]:
    """Short column titles: the run directory's name, or the column as it is (base)."""
    return [Path(c).name or c for c in results["columns"]]


def table_rows(results: dict) -> list[tuple[str, str, list[float]]]:
    """(label, metric, value per column) for every overall metric, then the headline metrics per group.
    The text table and the HTML report both show these rows."""
    columns, first = results["columns"], results[results["columns"][0]]
    rows = [(name, name, [results[c][name] for c in columns]) for name in first if name not in ("by_group", "predictions")]
    for group, scores in first["by_group"].items():
        rows += [(f"{group} / {name}", name, [results[c]["by_group"][group][name] for c in columns])
                 for name in scores if name in ("perplexity", "exact_match", "phrase_present")]
    return rows


def better_direction(name: str) -> Optional[bool]:
    """True: higher is better; False: lower (perplexity too); None: nearest 1 (length_ratio)."""
    return METRICS[name].higher_is_better if name in METRICS else False


def sample_indices(n_examples: int, count: int) -> list[int]:
    """`count` indices spread evenly over the examples."""
    step = max(1, n_examples // max(count, 1))
    return list(range(0, n_examples, step))[:count]


def question_of(prompt: str) -> str:
    """The user's question in a rendered chat prompt (the line before the assistant header), or its last line."""
    lines = prompt.strip().splitlines()
    return lines[-2] if len(lines) > 1 else lines[-1]


def format_table(results: dict) -> str:
    names = column_names(results)
    width = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'metric (' + results['data'] + ')':<40}" + "".join(f"{n:>{width}}" for n in names) + "   better",
             "-" * (40 + width * len(names) + 12)]
    for label, name, values in table_rows(results):
        better = {True: "higher", False: "lower", None: "nearer 1"}[better_direction(name)]
        lines.append(f"{label:<40}" + "".join(f"{v:>{width}.3f}" for v in values) + f"   {better}")
    return "\n".join(lines)


def format_samples(results: dict, count: int) -> str:
    lines = []
    for i in sample_indices(len(results["examples"]), count):
        ex = results["examples"][i]
        lines += [f"\nQ: {question_of(ex['prompt'])}", f"  expected: {ex['reference']}"]
        lines += [f"  {name + ':':<10}{results[c]['predictions'][i]}" for c, name in zip(results["columns"], column_names(results))]
    return "\n".join(lines)
