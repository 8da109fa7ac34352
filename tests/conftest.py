"""Tiny random models (2 layers, hidden 64) and a byte-level tokenizer, built in code: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(chatml: bool) -> PreTrainedTokenizerFast:
    """256 byte tokens plus specials. GPT-2 style (eos only, no pad, no template) or ChatML style."""
    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(sorted(byte_tokens))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"] if chatml else ["<|endoftext|>"]
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=specials[-1])
    if chatml:
        tok.bos_token = "<|im_start|>"
        tok.pad_token = "<|im_end|>"  # like SmolLM2: pad == eos
        tok.chat_template = CHATML
    return tok


def model_config(arch: str, vocab_size: int):
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=256)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)


def save_tiny(arch: str, path: Path) -> Path:
    torch.manual_seed(1234)
    tok = make_tokenizer(chatml=arch == "llama")
    cfg = model_config(arch, len(tok))
    cfg.eos_token_id = cfg.bos_token_id = tok.eos_token_id
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
