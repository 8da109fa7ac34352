"""The Python API: the same validation as the CLI, configs as a dict or a file, log lines visible by default, and
generate() giving what `loratune generate` gives."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from badinput import run_cli
from conftest import QA, write_jsonl

import loratune
from loratune.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def config_dict(model_dir, data, out):
    return {"model": {"name": str(model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"datasets": [{"path": str(data), "format": "completion",
                                   "fields": {"prompt": "question", "response": "answer"}}], "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, "report_to": []}, "output_dir": str(out)}


def test_train_takes_a_dict_or_a_file_and_checks_it(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    run_dir, final = loratune.train(config_dict(tiny_llama_dir, data, tmp_path / "a"))
    assert final["steps"] == 2 and (run_dir / "adapter_model.safetensors").is_file()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_dict(tiny_llama_dir, data, tmp_path / "b")))
    assert loratune.train(tmp_path / "c.yaml")[1]["steps"] == 2
    bad = config_dict(tiny_llama_dir, data, tmp_path / "c")
    bad["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="loratune calls it 'train.lr'"):
        loratune.train(bad)


def test_log_lines_are_visible_from_python(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_dict(tiny_llama_dir, data, tmp_path / "run")))
    code = f"import loratune; loratune.train({str(tmp_path / 'c.yaml')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved adapter to" in proc.stderr and "LoRA on" in proc.stderr


def test_generate_gives_what_the_command_gives(tiny_run, tmp_path):
    prompts = ["What is 1 plus 2?", "What is 3 plus 0?"]
    answers = loratune.generate(tiny_run, prompts, max_new_tokens=5, device="cpu")
    (tmp_path / "p.txt").write_text("".join(p + "\n" for p in prompts))
    code, text = run_cli(["generate", str(tiny_run), "--input", "p.txt", "--output", "o.jsonl", "--max_new_tokens", "5",
                          "--device", "cpu"], tmp_path)
    assert code == 0, text
    import json

    assert answers == [json.loads(line)["output"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]


def test_show_logs_leaves_a_programs_own_logging_alone(monkeypatch):
    from loratune.logs import show_logs

    log = logging.getLogger("loratune")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    show_logs()
    assert log.handlers == []
