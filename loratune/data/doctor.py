"""`loratune doctor CONFIG`: a pre-flight look at the data before any GPU time is spent.

Errors (exit 1): a dataset with no examples or no trained tokens. Warnings: trained examples that never show
the model EOS (it would not learn to stop), double BOS, empty answers, duplicate examples, truncation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from ..config import Config
from ..model.load import load_tokenizer, use_chat_template
from .examples import IGNORE, Example, dataset_examples, resolve_preset


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_examples(name: str, examples: list[Example], tok: PreTrainedTokenizerBase, stats: dict, found: Findings) -> list[str]:
    """Append what is wrong with one dataset's training examples to `found`; return its summary lines."""
    n_tokens = sum(len(e.input_ids) for e in examples)
    trained = [[t for t, label in zip(e.input_ids, e.labels) if label != IGNORE] for e in examples]
    n_trained = sum(map(len, trained))
    lines = [f"{name}: {len(examples)} examples, {n_tokens:,} tokens, {n_trained:,} trained "
             f"({100 * n_trained / max(n_tokens, 1):.1f}%), truncated {stats['truncated']}, dropped {stats['dropped']}"]
    if not examples or n_trained == 0:
        found.errors.append(f"{name}: no trained tokens; check the format and field mapping (loss would be undefined)")
        return lines
    checks = {
        "never train on EOS (the model would not learn to stop)": sum(tok.eos_token_id not in t for t in trained),
        "start with a double BOS": sum(tok.bos_token_id is not None and e.input_ids[:2] == [tok.bos_token_id] * 2
                                       for e in examples),
        "have an empty answer": sum(not tok.decode(t, skip_special_tokens=True).strip() for t in trained),
        "are duplicates of an earlier example": len(examples) - len({tuple(e.input_ids) for e in examples}),
        "were truncated to max_length": stats["truncated"],
    }
    for what, count in checks.items():
        if count:
            found.warnings.append(f"{name}: {count} of {len(examples)} examples {what}")
    return lines


def render_trained(example: Example, tok: PreTrainedTokenizerBase, color: bool) -> str:
    """The example's text with trained tokens marked: green on a terminal, ⟦…⟧ otherwise."""
    start, end = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    out, inside = [], False
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if trained != inside:
            out.append(start if trained else end)
            inside = trained
        out.append(tok.decode([token]))
    return "".join(out) + (end if inside else "")


def doctor(cfg: Config, out: TextIO | None = None) -> int:
    """Print the report; return the exit code (1 when there are errors)."""
    out = out or sys.stdout  # looked up per call, so a redirected stdout is honoured
    tok = load_tokenizer(cfg.model)
    use_chat_template(tok, cfg.data.chat_template)
    found = Findings()
    color = out.isatty()
    for ds in cfg.data.datasets:
        ds, build = resolve_preset(ds)
        got = dataset_examples(ds, build, cfg.data, tok, cfg.train.seed)
        name = ds.preset or ds.hub or ds.path
        for line in check_examples(name, got["train"], tok, got["stats"], found):
            print(line, file=out)
        print(f"  held out: {len(got['held_out'])} examples; skipped bad records: {len(got['skipped'])}", file=out)
        for example in got["train"][:2]:
            print("  ---\n  " + render_trained(example, tok, color).replace("\n", "\n  "), file=out)
    for w in found.warnings:
        print(f"warning: {w}", file=out)
    for e in found.errors:
        print(f"error: {e}", file=out)
    print(f"{len(found.errors)} errors, {len(found.warnings)} warnings", file=out)
    return 1 if found.errors else 0
