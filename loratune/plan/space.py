"""What a sweep varies, read and checked before any trial runs: `--grid KEY=V1,V2,...` or a SPACE.yaml of ranges.

SPACE.yaml maps dotted config keys to what a trial may take:

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # a float range (log-uniform with log: true)
    lora.r: {low: 4, high: 32, step: 4}                # whole numbers when low and high are (step optional)
    lora.target_modules: [all-linear, auto]            # a list: one of these values
    method: [lora, full]

Every value a trial can get (each grid value; each range's ends; each listed value) is put into the config as an
override and checked like one, so a typo'd key or an impossible value fails here, naming the key or file:line.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any, Optional, Union

from ..checks import values
from ..config import Config, ConfigError, load_config
from ..yaml_file import load_value, read_yaml

GridValue = Union[str, int, float, bool, None]


@dataclasses.dataclass
class Space:
    """A sweep's settings: what varies, over which base config; stored with the sweep so that a worker that joins
    (or a restart) runs the same sweep."""

    kind: str
    """`grid` or `search`."""
    params: dict[str, Any]
    """grid: key -> list of values; search: key -> list of values or {low, high, log, step}."""
    base: dict
    """The config every trial starts from (the file with the command's --key=value overrides), as a dict."""
    trials: Optional[int] = None
    """search: how many trials in all (over every worker); grid: the number of grid points."""

    def points(self) -> list[dict[str, GridValue]]:
        """grid: every combination of the values, in the order they were given."""
        keys = list(self.params)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.params.values())]


def base_config(config: Optional[str], overrides: list[tuple[str, Any]]) -> dict:
    """The base config as a plain dict (checked); output_dir is set per trial."""
    return dataclasses.asdict(load_config(config, overrides))


def trial_config(base: dict, settings: dict[str, Any], run_dir: Path) -> Config:
    """The config of one trial: the base with the trial's settings; resume: auto, so a retried trial continues its
    checkpoint."""
    return load_config(copy.deepcopy(base), [*settings.items(), ("output_dir", str(run_dir)), ("train.resume", "auto")])


def parse_grid(items: list[str], base: dict) -> Space:
    """`--grid lora.r=4,8,16 train.lr=1e-4,5e-4`: each value read as an override is; each checked in the config."""
    params: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"--grid {item}: write KEY=V1,V2,... (e.g. lora.r=4,8,16)")
        if key in params:
            raise ConfigError(f"--grid {key} is given twice; list all its values once: {key}=V1,V2,...")
        values = [load_value(v) for v in text.split(",")]
        for value in values:
            if isinstance(value, (list, dict)):
                raise ConfigError(f"--grid {key}={text}: {value!r} is not one value; list values in a SPACE.yaml "
                                  "(loratune sweep --search) instead")
        params[key] = [_check(base, key, value, f"--grid {key}={text}") for value in values]
        if len(set(map(repr, params[key]))) < len(values):
            raise ConfigError(f"--grid {key}={text}: a value is given twice; list each once")
    if not params:
        raise ConfigError("--grid needs at least one KEY=V1,V2,...")
    space = Space("grid", params, base)
    space.trials = len(space.points())
    return space


def _check(base: dict, key: str, value: Any, where: str) -> Any:
    """The value as the config holds it (`1e-4`, a string to YAML 1.1, becomes 0.0001), or the config's error."""
    if key == "output_dir":
        raise ConfigError(f"{where}: output_dir is set per trial (SWEEP_DIR/trial-...); choose the sweep's folder "
                          "with --dir")
    try:
        cfg = load_config(copy.deepcopy(base), [(key, value)])
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('config: ')}") from None
    return next(values(cfg, key))[1]


def parse_space(path: str | Path, base: dict, trials: int) -> Space:
    """SPACE.yaml (see the module docstring); errors name the file and line."""
    path = Path(path)
    raw, lines = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of dotted config keys to ranges or lists, e.g. "
                          "`train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}`")
    params = {}
    for key, spec in raw.items():
        where = f"{path}:{lines.get(str(key), '?')}"
        if isinstance(spec, dict) and not {"low", "high"} & set(spec):
            first = next(iter(spec), "lr")
            raise ConfigError(f"{where}: '{key}' is a section; write dotted keys, e.g. `{key}.{first}: "
                              "{low: ..., high: ...}`")
        spec = _range(str(key), spec, where)
        checked = [_check(base, str(key), value, where) for value in _probes(spec)]
        params[str(key)] = checked if isinstance(spec, list) else spec
    if not params:
        raise ConfigError(f"{path}: no keys to search; write e.g. `train.lr: {{low: 1.0e-5, high: 1.0e-3, log: true}}`")
    return Space("search", params, base, trials=trials)


def _range(key: str, spec: Any, where: str) -> Any:
    if isinstance(spec, list):
        if not spec or any(isinstance(v, (list, dict)) for v in spec):
            raise ConfigError(f"{where}: {key}: a list gives the values to choose from, each one plain value")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {key}: expected a list of values or {{low: ..., high: ...}}, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: {key}: a range is {{low: ..., high: ...}} with optional log: true and step: N"
                          + (f" (unknown: {', '.join(sorted(map(str, unknown)))})" if unknown else ""))
    low, high = (_number(spec[k], f"{where}: {key}.{k}") for k in ("low", "high"))
    if low > high:
        raise ConfigError(f"{where}: {key}: low {low:g} is above high {high:g}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: {key}: a log range needs low above 0, got {low:g}")
    if "step" in spec and (log or _number(spec["step"], f"{where}: {key}.step") <= 0):
        raise ConfigError(f"{where}: {key}.step: a step above 0, and not with log: true")
    return {"low": low, "high": high, "log": log, **({"step": spec["step"]} if "step" in spec else {})}


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string, as configs do
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return value


def _probes(spec: Any) -> list:
    """The values that stand for a range when checking it against the config: its ends (or every listed value)."""
    return spec if isinstance(spec, list) else [spec["low"], spec["high"]]


def is_int_range(spec: dict) -> bool:
    return all(isinstance(spec[k], int) for k in ("low", "high")) and isinstance(spec.get("step", 1), int)


def short(value: Any) -> str:
    """A value as trial names and tables show it: 0.0001 -> 1e-04, lists joined by +."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)
