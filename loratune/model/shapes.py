"""Model shapes and a byte-level tokenizer built in code, for tests and benchmarks (throughput does
not depend on weight values, so random-init models of the real shapes measure real speed)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer(chatml: bool) -> PreTrainedTokenizerFast:
    """256 byte tokens plus specials: GPT-2 style (eos only, no pad, no template) or ChatML style (pad == eos)."""
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"] if chatml else ["<|endoftext|>"]
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=specials[-1])
    if chatml:
        tok.bos_token, tok.pad_token, tok.chat_template = "<|im_start|>", "<|im_end|>", CHATML
    return tok


def model_config(shape: str, vocab_size: int | None = None) -> PretrainedConfig:
    """`tiny-gpt2`, `tiny-gpt_neox`, `tiny-llama` (2 layers, hidden 64), or the real `gpt2`, `gpt2-medium`, `gpt2-large`, `smollm2-135m`."""
    if shape == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    if shape == "tiny-gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=256, eos_token_id=vocab_size - 1)
    if shape == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                           eos_token_id=vocab_size - 1)
    if shape == "gpt2":
        return GPT2Config()
    if shape == "gpt2-medium":
        return GPT2Config(n_embd=1024, n_layer=24, n_head=16)
    if shape == "gpt2-large":
        return GPT2Config(n_embd=1280, n_layer=36, n_head=20)
    if shape == "smollm2-135m":  # HuggingFaceTB/SmolLM2-135M's config.json
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown shape '{shape}'")
