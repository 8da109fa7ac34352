"""Configuration: small dataclasses that are the single source of truth for YAML and CLI flags.

Each field's docstring (the string literal under it) is its documentation; `field_docs` reads
them back so `loratune train --help` and the README's config reference never drift apart.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .checks import problems, suggestion
from .files import atomic_write
from .yaml_file import ConfigError, load_value, read_yaml, report_problems


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Alias `smollm2-135m-instruct` (embedded, offline), a hub id (`gpt2`, `EleutherAI/pythia-160m`), a local save_pretrained directory, or a `.gguf` file."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load; ignored for local paths."""
    dtype: str = "auto"
    """Weight dtype: `auto` (fp32 on CPU, bf16 on GPU), `float32`, `bfloat16` or `float16`."""
    adapter: Optional[str] = None
    """Continue training this adapter (a loratune run or any PEFT LoRA folder, safetensors) instead of starting a
    new one; its own LoRA settings (rank, targets, ...) then win over lora.*."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off by default: only turn on for repositories you trust."""
    gguf_cache_dir: Optional[str] = "~/.cache/loratune/gguf"
    """A GGUF model (the embedded default too) is dequantized once into this folder as fp32 safetensors plus its
    tokenizer, keyed by the file's path, size and modification time, and loaded from there afterwards (0.3 s instead
    of about 28 s for the embedded model on a 2-core CPU). null: dequantize the GGUF file at every load."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    bias: str = "none"
    """Which biases to train: `none`, `all` or `lora_only`."""
    target_modules: Union[str, list[str]] = "auto"
    """`auto` (per architecture), `all-linear`, or an explicit list of module names."""
    use_dora: bool = False
    """DoRA: learn each adapted weight's magnitude apart from its direction (peft's use_dora)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning."""
    init: str = "default"
    """How the adapter starts: `default` (A Kaiming-uniform, B zero), `gaussian` (A Gaussian, B zero), `pissa` (from
    each weight's principal singular vectors) or `olora` (orthonormal, by QR). pissa and olora move part of the base
    weights into the adapter; the saved adapter is converted back so that it fits the original base."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained and saved whole besides the adapters, e.g. `[lm_head]`."""
    layers: Optional[list[int]] = None
    """Adapt only these layer indices (null: every layer)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Ranks that differ from r, by module name or regex, e.g. `{q_proj: 8}`."""


@dataclass
class DatasetConfig:
    preset: Optional[str] = None
    """A preset (squad, ag_news, wikitext-103, ...; see loratune/data/presets.py): sets hub, subset, splits and format; keys you
    set win. With data_files, only its format and column mapping apply (a local copy in the preset's layout)."""
    path: str = "demo"
    """`demo` (the embedded demo set), a local file (.jsonl .json .csv .tsv .txt .parquet), a directory or a glob."""
    hub: Optional[str] = None
    """Load through `datasets.load_dataset` instead of `path`: a hub name (`squad`) or a builder (`json`, `csv`) with data_files."""
    subset: Optional[str] = None
    """The hub dataset's configuration name (e.g. `wikitext-103-raw-v1`)."""
    split: str = "train"
    """The hub split to train on."""
    eval_split: Optional[str] = None
    """A hub split to hold out for evaluation; without it, eval_fraction of the training records is held out."""
    data_files: list[str] = field(default_factory=list)
    """Files for a `datasets` builder named in `hub` (json, csv, parquet, text)."""
    streaming: bool = False
    """Stream the hub dataset instead of downloading it whole (use with max_samples)."""
    text_mode: str = "lines"
    """For .txt files: `lines` (one example per line) or `document` (the whole file is one example)."""
    weight: float = 1.0
    """Sampling weight: this dataset contributes weight x (its capped size) examples per epoch; >1 repeats, <1 subsamples."""
    format: str = "chat"
    """Record format: `chat` (messages), `completion` (prompt + response) or `text`."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map from the format's field names to your column names, e.g. `{prompt: question}`."""
    eval_fraction: float = 0.0
    """Fraction of records held out for evaluation when the source has no eval split."""
    max_samples: Optional[int] = None
    """Use at most this many training records from this dataset (overrides data.max_samples_per_dataset)."""
    weight_field: Optional[str] = None
    """A numeric column of per-example sampling weights (like WeightedRandomSampler): rare examples can be oversampled."""


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])
    """Datasets to train on."""
    max_length: int = 256
    """Maximum tokens per example; longer examples are truncated (`truncation: truncate`) or dropped."""
    truncation: str = "truncate"
    """`truncate` or `drop` examples longer than max_length."""
    max_samples_per_dataset: Optional[int] = 10000
    """Default cap on training records per dataset (a random subset under the seed); null for no cap."""
    cache_dir: Optional[str] = "~/.cache/loratune/tokenized"
    """Where tokenized datasets are cached (keyed by file contents, tokenizer, template, max_length); null turns it off."""
    on_bad_record: str = "error"
    """`error` stops at the first bad record, naming file, line and field; `skip` counts and reports them instead."""
    chat_template: str = "auto"
    """The prompt format of chat records: `auto` (the tokenizer's own; loratune's plain `User:` / `Assistant:` format
    when it has none), `chatml`, `plain`, or a Jinja file. Saved with the run's tokenizer, so eval, generate, chat,
    merge and serve use the same."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens; each example attends only to itself and its
    positions restart at 0. batch_size then counts rows. Always on in the fast path."""


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to weight matrices only (never to biases or norms)."""
    schedule: str = "cosine"
    """After warmup: `cosine` or `linear` decay to lr * min_lr_ratio, or `constant`."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps; used when warmup_steps is 0."""
    min_lr_ratio: float = 0.1
    """The cosine and linear schedules decay to lr * min_lr_ratio."""
    num_epochs: float = 1.0
    """Passes over the training data; ignored when max_steps is set."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 turns clipping off)."""
    seed: int = 0
    """Seed for random, numpy and torch (data order, LoRA init, dropout)."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    log_every: int = 10
    """On the GPU, bring the loss to the host every N steps (metrics.jsonl still gets every step): fewer syncs keep
    the GPU busy. The CPU syncs every step."""
    precision: str = "auto"
    """`auto` (bf16 autocast on GPU, fp32 on CPU), `fp32`, `bf16`, or `fp16` (GPU, with a grad scaler)."""
    gradient_checkpointing: bool = False
    """Recompute activations during backward to save memory; the adapters still train."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms) for bit-reproducible GPU runs; slower."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end, or when interrupted)."""
    save_every_minutes: float = 10.0
    """Also write a checkpoint when this many minutes have passed since the last one, so a kill never loses more
    than that (0: by steps only)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints, plus the best by best_metric."""
    resume: str = "never"
    """`auto`: continue from output_dir's newest checkpoint when it has one. `never`: always start fresh."""
    eval_every: int = 0
    """Held-out loss, overall and per dataset, every N steps (0: off)."""
    generate_every_evals: int = 0
    """Every N periodic evals, also answer a fixed sample of held-out prompts greedily and log exact match, BLEU,
    ROUGE-L, length and phrase-present, so a run shows generation quality moving, not only the loss (0: off)."""
    generate_samples: int = 16
    """Size of that fixed sample (the first held-out examples that have a prompt)."""
    best_metric: str = "eval_loss"
    """Lower-is-better eval metric that picks the best checkpoint and drives early stopping (eval_loss or eval_loss/DATASET)."""
    early_stopping_patience: int = 0
    """Stop after this many evals without improvement of best_metric (0: never stop early)."""
    early_stopping_min_delta: float = 0.0
    """An eval counts as an improvement only if it beats the best by more than this."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers besides metrics.jsonl: tensorboard (skipped when not installed), wandb, mlflow."""
    parallel: str = "ddp"
    """With several processes (torchrun, --nproc): `ddp` keeps a whole model on every GPU; `fsdp` (FSDP2) shards
    weights, gradients and optimizer state for models that don't fit on one GPU."""
    fast: str = "auto"
    """GPU fast path: packed rows without cross-contamination, fused AdamW, the step replayed as a CUDA graph
    (train.cuda_graphs) and, for long runs, compiled (train.compile). `auto` (on with CUDA), `on` or `off`."""
    compile: str = "auto"
    """On the fast path, compile mask + model + loss as one graph (flex attention). `auto`: when the run has at least
    20M token slots (rows x max_length x steps), about where the 1-2 minutes of compiling before the first step pay
    back (2.6-3.5x more tokens/s at 16 x 1024 rows on an H100, and less memory); `on`; `off`."""
    cuda_graphs: str = "auto"
    """Record a packed micro-batch's forward + backward once as a CUDA graph and replay it at every step, which
    removes the per-kernel host cost that bounds small models. `auto`: where the run allows it (CUDA, packed rows,
    one process, no fp16, no gradient checkpointing), falling back to plain launches if the capture fails;
    `on`: an error where it can't; `off`."""


@dataclass
class EvalConfig:
    max_new_tokens: int = 32
    """Greedy generation length for exact-match and phrase-present."""
    batch_size: int = 16
    """Prompts per generation batch."""


@dataclass
class Config:
    method: str = "lora"
    """`lora` trains an adapter; `full` fine-tunes every weight with the same loop (to compare the two)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    output_dir: str = "runs/latest"
    """Directory for this run: adapter, tokenizer, resolved config, metrics.jsonl."""


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def field_docs(cls: type) -> dict[str, str]:
    """Read the docstring literal under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, errors: list) -> Any:
    """Check `value` against the annotation `tp`, returning it (converted where lossless); a nested dataclass
    adds its own problems to `errors`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, errors)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(t) for t in typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}", errors) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` as a string; accept it as the number the user meant.
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _sections(cls: type) -> dict[str, list[str]]:
    """Each section of the config and its keys, for hints about a key written in the wrong section."""
    hints = typing.get_type_hints(cls)
    return {f.name: [g.name for g in dataclasses.fields(hints[f.name])] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])}


def _build(cls: type, raw: Any, prefix: str, errors: list) -> Any:
    """The dataclass from a mapping; every problem is added to `errors` (key, message), and the fields with a problem
    keep their defaults so that the other keys are still checked."""
    if not isinstance(raw, dict):
        errors.append((prefix, f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            errors.append((full, f"unknown key '{full}'; {suggestion(str(key), prefix, names, _sections(Config))}"))
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], full, errors)
        except ConfigError as e:
            errors.append((full, str(e)))
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    for name in missing:
        if name not in raw:
            errors.append((prefix, f"{prefix or 'config'}: missing key '{name}'"))
    return None if missing else cls(**kwargs)  # with a key missing there is an error to report, never a None to use


def _apply_override(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn `--train.lr=1e-4` / `--train.lr 1e-4` into (key, YAML-parsed value) pairs."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr=1e-4")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
        try:
            pairs.append((key, load_value(text)))
        except yaml.YAMLError:
            raise ConfigError(f"override --{key}: can't read {text!r} as a value; quote it") from None
    return pairs


def load_dataclass(path: str | Path, cls: type, overrides: list[tuple[str, Any]] = ()) -> Any:
    """Read a YAML file into the dataclass `cls`, applying dotted overrides; errors name the file, line and key."""
    path = Path(path)
    raw, lines = read_yaml(path)
    for key, value in overrides:
        if not isinstance(raw, dict):
            break
        _apply_override(raw, key, value)
    errors: list = []
    built = _build(cls, raw, "", errors)
    if cls is Config:  # fields with a type problem kept their defaults, so the ranges of the others still get checked
        errors += [(key, f"{key}: {message}") for key, message in problems(built)]
    report_problems(path, errors, lines, {key for key, _ in overrides})
    return built


def load_config(source: str | Path | dict | None = None, overrides: list[tuple[str, Any]] = ()) -> Config:
    """A validated Config from a YAML file (the shipped default when None) or a dict, with dotted overrides."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        for key, value in overrides:
            _apply_override(raw, key, value)
        errors: list = []
        cfg = _build(Config, raw, "", errors)
        report_problems(None, errors, {})
        validate(cfg)
        return cfg
    return load_dataclass(source or DEFAULT_CONFIG, Config, overrides)


def validate(cfg: Config) -> None:
    """Check a Config built in code as a file is checked: every choice and range, all problems at once."""
    report_problems(None, [(key, f"{key}: {message}") for key, message in problems(cfg)], {})


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
