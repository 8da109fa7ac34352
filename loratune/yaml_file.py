"""Reading a config's YAML file: a key given twice is refused (plain YAML keeps the last one, silently), every
key's line is kept, and all problems are reported at once, each with its line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, with a message that names the key and says how to fix it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last one, silently), and
    reads booleans as YAML 1.2 does: only true/false. PyYAML's 1.1 rules read `on`, `off`, `yes` and `no` as
    booleans, so `compile: on` would become `compile: True`."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice (first on line "
                                  f"{seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _key_lines(text: str) -> dict[str, int]:
    """The line of every key in a YAML text, by dotted key (list items as key[i])."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
                walk(item, f"{prefix}[{i}]")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:  # an empty file would otherwise be the defaults, silently
        raise ConfigError(f"{path} is empty; write the settings you want (see loratune train --help), or leave the "
                          "file out to use the shipped default config")
    return raw, _key_lines(text)


def report_problems(path: Path | None, errors: list, lines: dict[str, int], overridden: set[str] = frozenset()) -> None:
    """Raise one ConfigError listing every problem, each with its line where the file has one (a key set by a
    --key=value override is named as such)."""
    if not errors:
        return
    source = str(path) if path else "config"
    rows = []
    line_of = {key: lines.get(key) or lines.get(key.rsplit(".", 1)[0]) for key, _ in errors}
    for key, message in sorted(errors, key=lambda e: line_of[e[0]] or 10**9):
        line = line_of[key]
        if key in overridden:
            rows.append(f"--{key}: {message}")
        else:
            rows.append(f"{source}:{line}: {message}" if line else f"{source}: {message}")
    header = f"{len(rows)} problems in {source}:\n  " if len(rows) > 1 else ""
    raise ConfigError(header + "\n  ".join(rows))


def _yaml12_booleans(loader: type) -> None:
    bool_tag = "tag:yaml.org,2002:bool"
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


_yaml12_booleans(_UniqueKeyLoader)


def load_value(text: str) -> Any:
    """One value as YAML reads it in a config file (a --key=value override)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)
