"""Generation metrics in a small registry, each with its better direction (as lm-evaluation-harness does)."""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Optional

from transformers import PreTrainedTokenizerBase

from ..data.examples import Example


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
