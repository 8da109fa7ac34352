"""Evaluation: a registry of generation metrics, token-weighted perplexity, base vs adapter side by side."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import Config, DatasetConfig
from .data import IGNORE, Example, collate, load_data
from .distributed import Dist, my_share, sum_over_ranks
from .model import load_base_model, load_tokenizer, unwrap_causal_lm


@dataclass(frozen=True)
class Metric:
    fn: Callable[[list[str], list[list[str]]], float]
    """(predictions, references per prediction) -> score."""
    higher_is_better: Optional[bool]
    """True or False; None for a ratio whose best value is 1.0 (length_ratio)."""


METRICS: dict[str, Metric] = {}


def register_metric(name: str, higher_is_better: Optional[bool]):
    """Add a generation metric: `@register_metric("my_metric", higher_is_better=True)`."""
    def wrap(fn: Callable[[list[str], list[list[str]]], float]):
        METRICS[name] = Metric(fn, higher_is_better)
        return fn
    return wrap


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@register_metric("exact_match", higher_is_better=True)
def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    hits = [any(normalize_answer(p) == normalize_answer(r) for r in refs) for p, refs in zip(predictions, references)]
    return sum(hits) / max(len(hits), 1)


@register_metric("phrase_present", higher_is_better=True)
def phrase_present(predictions: list[str], phrases: list[list[str]]) -> float:
    """Rate of outputs that contain (one of) the phrase(s), case-insensitively."""
    hits = [any(ph.lower() in p.lower() for ph in phs) for p, phs in zip(predictions, phrases)]
    return sum(hits) / max(len(hits), 1)


@register_metric("bleu", higher_is_better=True)
def bleu(predictions: list[str], references: list[list[str]]) -> float:
    import sacrebleu

    # sacrebleu wants the same number of reference streams for every prediction; repeating a
    # reference changes neither the clipped n-gram counts nor the closest reference length.
    width = max(len(r) for r in references)
    streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(width)]
    return sacrebleu.corpus_bleu(predictions, streams).score


def _rouge(kind: str) -> Callable[[list[str], list[list[str]]], float]:
    def score(predictions: list[str], references: list[list[str]]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
        values = [scorer.score_multi(refs, p)[kind].fmeasure for p, refs in zip(predictions, references)]
        return 100 * sum(values) / max(len(values), 1)
    return score


for _kind in ("rouge1", "rouge2", "rougeL"):
    register_metric(_kind, higher_is_better=True)(_rouge(_kind))


def _lengths(predictions: list[str], references: list[list[str]]) -> tuple[int, int]:
    """Total words of the predictions, and of the reference closest in length to each (as BLEU picks it)."""
    pred = [len(p.split()) for p in predictions]
    ref = [min((len(r.split()) for r in refs), key=lambda n: (abs(n - c), n)) for c, refs in zip(pred, references)]
    return sum(pred), sum(ref)


@register_metric("length_ratio", higher_is_better=None)
def length_ratio(predictions: list[str], references: list[list[str]]) -> float:
    """Words generated per reference word: 1.0 is right, below is terse, above is rambling."""
    pred, ref = _lengths(predictions, references)
    return pred / max(ref, 1)


@register_metric("length_penalty", higher_is_better=True)
def length_penalty(predictions: list[str], references: list[list[str]]) -> float:
    """BLEU's brevity penalty made two-sided: exp(1 - longer/shorter) of total lengths; 1.0 when they match."""
    pred, ref = _lengths(predictions, references)
    if pred == 0 or ref == 0:
        return 0.0
    return math.exp(1 - max(pred, ref) / min(pred, ref))


@torch.no_grad()
def nll_and_count(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Summed NLL and count of the trained tokens of `examples` (perplexity = exp(nll / count))."""
    from .loss import sum_token_nll

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        nll, n = sum_token_nll(model, batch)
        total, count = total + nll.item(), count + n
    return total, count


def group_of(example: Example) -> str:
    """Results are reported per dataset, and per task within it where records carry a `task` field."""
    dataset, task = example.record.get("dataset", "data"), example.record.get("task")
    return f"{dataset} / {task}" if task else dataset


def reference_of(example: Example, tok: PreTrainedTokenizerBase) -> str:
    return tok.decode(example.input_ids[example.prompt_len :], skip_special_tokens=True).strip()


def score_generations(examples: list[Example], predictions: list[str], tok: PreTrainedTokenizerBase) -> dict[str, float]:
    references = [[reference_of(e, tok)] for e in examples]
    scores = {name: METRICS[name].fn(predictions, references)
              for name in ("exact_match", "bleu", "rougeL", "length_ratio", "length_penalty")}
    with_phrase = [(p, e.record["contains"]) for p, e in zip(predictions, examples) if e.record.get("contains")]
    if with_phrase:
        scores["phrase_present"] = phrase_present([p for p, _ in with_phrase], [[c] for _, c in with_phrase])
    return scores


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
        like = data.datasets[0]
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


def _models(run_dirs: list[Path], cfg: Config, device: str):
    """(column name, model) for the base and then each run, one loaded at a time to bound memory."""
    from .infer import load
    from .train import pick_device

    first, _ = load(run_dirs[0], device)
    if isinstance(first, PeftModel):  # an adapter switched off is the base, without loading it twice
        with first.disable_adapter():
            yield "base", first
    else:
        yield "base", load_base_model(cfg.model, pick_device(device)).eval()
    yield str(run_dirs[0]), first
    del first
    for run_dir in run_dirs[1:]:
        yield str(run_dir), load(run_dir, device)[0]


def evaluate(run_dirs: str | Path | list, device: str = "auto", samples: int = 3, file: str | Path | None = None,
             file_format: Optional[str] = None, max_length: Optional[int] = None, stride: Optional[int] = None,
             out: str | Path | None = None) -> dict:
    """Score the base model and each run side by side, overall and per dataset; write JSON and print a table.

    Data: the first run's held-out split, or every record of `file`. With max_length (and stride), long examples
    get sliding-window perplexity instead of being truncated. All runs must share their base model.
    """
    from .infer import generate_batch, load_run_config

    run_dirs = [Path(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    cfg = load_run_config(run_dirs[0])
    for other in run_dirs[1:]:
        if load_run_config(other).model != cfg.model:
            raise ValueError(f"{other} was trained on another base model than {run_dirs[0]}; compare runs of one base")
    tok = load_tokenizer(cfg.model, source=str(run_dirs[0]))
    held_out = eval_examples(cfg, tok, Path(file) if file else None, file_format, max_length is not None)
    scored = [w for e in held_out for w in windows(e, max_length, stride or max_length)] if max_length else held_out
    generative = [e for e in held_out if e.prompt_len > 0]
    groups = defaultdict(list)
    for e in scored:
        groups[group_of(e)].append(e)
    results: dict = {"columns": [], "data": str(file) if file else "held-out split"}
    for name, model in _models(run_dirs, cfg, device):
        sums = {g: nll_and_count(model, members, tok.pad_token_id) for g, members in sorted(groups.items())}
        predictions = generate_batch(model, tok, [e.input_ids[: e.prompt_len] for e in generative],
                                     cfg.eval.max_new_tokens, cfg.eval.batch_size)
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
    out = Path(out) if out else run_dirs[0] / ("eval.json" if file is None else f"eval-{Path(file).stem}.json")
    out.write_text(json.dumps(results, indent=2))
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


# Evaluation during training (the loop calls these at train.eval_every).


@torch.no_grad()
def held_out_losses(model: torch.nn.Module, held_out: list[Example], nll_of, autocast, d: Dist,
                    device: torch.device) -> dict[str, float]:
    """Mean held-out loss (nats per trained token), overall and per dataset; nll_of(examples) -> (sum, count).
    Each process scores its share of every dataset; the sums are added up, so every rank gets the same numbers."""
    model.eval()
    by_dataset: dict[str, list[Example]] = {}
    for e in held_out:
        by_dataset.setdefault(e.record.get("dataset", "data"), []).append(e)
    with autocast:
        shares = [nll_of(my_share(group, d)) for group in by_dataset.values()]
    model.train()
    sums = dict(zip(by_dataset, sum_over_ranks(torch.tensor(shares, dtype=torch.float64, device=device), d).tolist()))
    out = {"eval_loss": sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)}
    if len(sums) > 1:
        out.update({f"eval_loss/{name}": t / max(n, 1) for name, (t, n) in sums.items()})
    return out


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, tok, sample: list[Example], max_new_tokens: int, packed: bool,
                       autocast) -> dict[str, float]:
    """Greedy answers for a fixed held-out sample, scored like `loratune eval` (keys prefixed gen/)."""
    from .fast import ATTENTION_NAME
    from .infer import generate_batch

    causal_lm = unwrap_causal_lm(model)
    model.eval()
    if packed:  # generation pads and caches; it needs the model's ordinary attention
        causal_lm.set_attn_implementation("sdpa")
    try:
        with autocast:
            predictions = generate_batch(model, tok, [e.input_ids[: e.prompt_len] for e in sample], max_new_tokens,
                                         batch_size=len(sample))
    finally:
        if packed:
            causal_lm.set_attn_implementation(ATTENTION_NAME)
        model.train()
    return {f"gen/{k}": v for k, v in score_generations(sample, predictions, tok).items()}
