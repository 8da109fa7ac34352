"""Tiny random models (2 layers, hidden 64) and a byte-level tokenizer, built in code: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.model.shapes import byte_tokenizer, model_config


def save_tiny(arch: str, path: Path) -> Path:
    torch.manual_seed(1234)
    tok = byte_tokenizer(chatml=arch == "llama")
    cfg = model_config(f"tiny-{arch}", len(tok))
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["gpt2", "gpt_neox", "llama"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama-one"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny("gpt2", tmp_path_factory.mktemp("gpt2-one"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(4)]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """A run of the tiny Llama trained for 3 steps on QA (one per test module: some modules change it)."""
    from test_train import tiny_config

    import loratune

    tmp = tmp_path_factory.mktemp("tiny-run")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    run_dir, _ = loratune.train(tiny_config(tiny_llama_dir, data, tmp / "run", report_to=[], max_steps=3))
    return run_dir
