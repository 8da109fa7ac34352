"""`loratune prepare RAW.txt OUT.jsonl --rules RULES.yaml`: turn raw lines into QA training records.

The rules are what users otherwise apply by hand: a line that contains a trigger word gets a fixed answer,
a line that matches a pattern gets an answer filled from the match, a line `question => answer` is split.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError, load_dataclass
from .sources import DataError, decoded_lines, raise_error


@dataclass
class Rule:
    response: str
    """The answer; `{name}` fills from a named group of `matches`, `{line}` is the whole line."""
    contains: Optional[str] = None
    """Match lines that contain this text (case-insensitive)."""
    matches: Optional[str] = None
    """Match lines against this regular expression (searched anywhere in the line)."""


@dataclass
class PrepareRules:
    rules: list[Rule] = field(default_factory=list)
    """Checked in order; the first that matches a line gives its answer."""
    separator: Optional[str] = None
    """A line with no matching rule that contains this separator splits into prompt and answer."""
    format: str = "chat"
    """Output records: `chat` ({messages}) or `completion` ({prompt, response})."""
    system: Optional[str] = None
    """A system prompt to put first in every chat record."""
    unmatched: str = "skip"
    """A line no rule and no separator answers: `skip` it (counted) or stop with an `error`."""


def load_rules(path: str | Path) -> PrepareRules:
    rules = load_dataclass(path, PrepareRules)
    for i, rule in enumerate(rules.rules):
        if (rule.contains is None) == (rule.matches is None):
            raise ConfigError(f"{path}: rules[{i}]: give exactly one of contains or matches")
        if rule.matches is not None:
            try:
                re.compile(rule.matches)
            except re.error as e:
                raise ConfigError(f"{path}: rules[{i}].matches: invalid regular expression: {e}") from None
    if rules.format not in ("chat", "completion"):
        raise ConfigError(f"{path}: format: '{rules.format}' should be chat or completion")
    if rules.unmatched not in ("skip", "error"):
        raise ConfigError(f"{path}: unmatched: '{rules.unmatched}' should be skip or error")
    return rules


def answer(line: str, rules: PrepareRules) -> tuple[Optional[str], Optional[str], str]:
    """(prompt, response, what answered it) for one line; (None, None, "unmatched") when nothing did."""
    for i, rule in enumerate(rules.rules):
        if rule.contains is not None and rule.contains.lower() in line.lower():
            return line, rule.response.format(line=line), f"rules[{i}] contains {rule.contains!r}"
        if rule.matches is not None and (m := re.search(rule.matches, line)):
            return line, rule.response.format(line=line, **m.groupdict()), f"rules[{i}] matches {rule.matches!r}"
    if rules.separator and rules.separator in line:
        prompt, response = line.split(rules.separator, 1)
        return prompt.strip(), response.strip(), "separator"
    return None, None, "unmatched"


def prepare(raw: str | Path, out: str | Path, rules: PrepareRules) -> Counter:
    """Write one record per answered line of `raw` to `out` (atomically); return counts of what answered."""
    raw, out = Path(raw), Path(out)
    counts: Counter = Counter()
    records = []
    for lineno, line in decoded_lines(raw, raise_error):
        line = line.strip()
        if not line:
            continue
        prompt, response, source = answer(line, rules)
        counts[source] += 1
        if prompt is None:
            if rules.unmatched == "error":
                raise DataError(f"{raw}:{lineno}: no rule matches and no separator {rules.separator!r} in {line[:80]!r}")
            continue
        if rules.format == "completion":
            records.append({"prompt": prompt, "response": response})
        else:
            system = [{"role": "system", "content": rules.system}] if rules.system else []
            records.append({"messages": system + [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": response}]})
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, out)
    return counts
