from pathlib import Path

import pytest

from loratune.cli import config_reference
from loratune.config import Config, ConfigError, load_config, parse_overrides

SHIPPED = sorted((Path(__file__).parents[1] / "loratune" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    assert isinstance(load_config(path), Config)
    assert path.read_text().startswith("# Run with:")


def test_no_argument_uses_the_default_config():
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.data.datasets[0].path == "demo"


@pytest.mark.parametrize("text,message", [
    ("lora:\n  rank: 8\n", r"c.yaml:2: unknown key 'lora.rank'; loratune calls it 'lora.r'"),
    ("trian:\n  lr: 1\n", r"unknown key 'trian'; did you mean 'train'\?"),
    ("train:\n  batch_size: eight\n", r"train.batch_size: expected int, got 'eight'"),
    ("lora:\n  r: true\n", r"lora.r: expected int, got True"),  # a bool is not an int
    ("data:\n  datasets:\n    - path: a.jsonl\n      fromat: chat\n",
     r"unknown key 'data.datasets\[0\].fromat'; did you mean 'data.datasets\[0\].format'"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_overrides_parse_and_apply():
    pairs = parse_overrides(["--train.lr=1e-4", "--lora.r", "4", "--lora.target_modules=[c_attn]", "--train.max_steps=7"])
    cfg = load_config(None, pairs)
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 4 and cfg.lora.target_modules == ["c_attn"] and cfg.train.max_steps == 7


def test_override_with_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr'"):
        load_config(None, parse_overrides(["--train.lrr=3"]))


def test_cli_help_documents_every_key():
    text = "\n".join(config_reference())
    for key in ("--model.name", "--lora.target_modules", "--data.datasets[].fields", "--train.grad_accum", "--output_dir"):
        assert key in text
    assert "trust" in text  # docstrings reach the help, not just the names


def test_on_and_off_stay_words_as_in_yaml_1_2(tmp_path):
    """`compile: on` is the word the docs use; PyYAML's 1.1 rules would read it as True."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  compile: on\n  cuda_graphs: off\n  fast: 'on'\n")
    cfg = load_config(f, parse_overrides(["--train.deterministic=true"]))
    assert (cfg.train.compile, cfg.train.cuda_graphs, cfg.train.fast, cfg.train.deterministic) == ("on", "off", "on", True)
