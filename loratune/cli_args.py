"""Argument helpers shared by the commands of cli.py and cli_tools.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import ConfigError


def config_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """CONFIG is the first argument when it is not an option: `--lora.r 8` must not make 8 the config file."""
    if not argv or argv[0].startswith("-"):
        return None, argv
    if "=" in argv[0] and not Path(argv[0]).exists():
        raise ConfigError(f"{argv[0]}: no such config file; an override needs two dashes: --{argv[0]}")
    return argv[0], argv[1:]


def trust_flag(parser: argparse.ArgumentParser, with_template: bool = False) -> None:
    parser.add_argument("--base", help="the base model for a PEFT adapter folder (default: its adapter_config.json)")
    if with_template:
        parser.add_argument("--template", help="prompt format: chatml, plain or a Jinja file (default: the run's own)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow Python code shipped with the run or its base model to run (off: a run's own "
                             "config can't turn it on)")
