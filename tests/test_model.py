import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from loratune.config import LoraConfig, ModelConfig
from loratune.model.load import (
    ModelLoadError,
    add_lora,
    load_base_model,
    load_tokenizer,
    resolve_source,
    resolve_target_modules,
)

EXPECTED = {"gpt2": ["c_attn", "c_proj"], "gpt_neox": ["query_key_value", "dense"],
            "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def test_auto_targets_per_architecture(tiny_model_dir):
    model = load_base_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    targets = resolve_target_modules(model, "auto")
    assert targets == EXPECTED[model.config.model_type]
    lora = add_lora(model, LoraConfig(r=4, alpha=8, target_modules="auto"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert adapted == set(targets)


def test_all_linear_and_explicit_list(tiny_llama_dir):
    base = load_base_model(ModelConfig(name=str(tiny_llama_dir)), torch.device("cpu"))
    assert resolve_target_modules(base, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    model = add_lora(base, LoraConfig(r=4, target_modules="all-linear"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= adapted and "lm_head" not in adapted


def test_unknown_target_module_is_a_clear_error(tiny_llama_dir):
    base = load_base_model(ModelConfig(name=str(tiny_llama_dir)), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match=r"\['c_attn'\] not found in llama"):
        resolve_target_modules(base, ["c_attn"])


def test_only_lora_weights_train(tiny_gpt2_dir):
    model = add_lora(load_base_model(ModelConfig(name=str(tiny_gpt2_dir)), torch.device("cpu")), LoraConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gpt2_gets_pad_and_default_template(tiny_gpt2_dir):
    tok = load_tokenizer(ModelConfig(name=str(tiny_gpt2_dir)))
    assert tok.pad_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "User: hi\nAssistant:"


def test_offline_hub_error_names_alternatives(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the offline run needs a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--model.name=EleutherAI/pythia-160m",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "could not load 'EleutherAI/pythia-160m' from the Hugging Face hub" in proc.stderr
    assert "smollm2-135m-instruct" in proc.stderr and "save_pretrained" in proc.stderr and ".gguf" in proc.stderr
    assert not (tmp_path / "run").exists()  # a failed load leaves no empty run directory


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_embedded_alias_resolves_to_a_gguf_file():
    path, kwargs = resolve_source("smollm2-135m-instruct")
    assert kwargs["gguf_file"].endswith(".gguf")


def test_mismatched_base_is_a_clear_error(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    from loratune.model.load import load_adapter

    gpt2 = add_lora(load_base_model(ModelConfig(name=str(tiny_gpt2_dir)), torch.device("cpu")),
                    LoraConfig(r=4, target_modules=["c_attn"]))
    gpt2.save_pretrained(tmp_path)
    other = load_base_model(ModelConfig(name=str(tiny_llama_dir)), torch.device("cpu"))
    with pytest.raises((ModelLoadError, ValueError)):
        load_adapter(other, tmp_path)
    assert isinstance(load_adapter(load_base_model(ModelConfig(name=str(tiny_gpt2_dir)), torch.device("cpu")), tmp_path), PeftModel)


def test_gguf_is_dequantized_once_into_a_copy_that_loads_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    """The embedded GGUF loaded directly and through its cached copy: same weights, same tokens, same chat prompt."""
    import transformers

    cpu = torch.device("cpu")
    cached_cfg, direct_cfg = ModelConfig(gguf_cache_dir=str(tmp_path / "cache")), ModelConfig(gguf_cache_dir=None)
    cached, cached_tok = load_base_model(cached_cfg, cpu), load_tokenizer(cached_cfg)
    (copy,) = (tmp_path / "cache").iterdir()  # one finished folder, no temporary left behind
    assert copy.name.startswith("SmolLM2-135M-Instruct") and (copy / "model.safetensors").is_file()
    direct, direct_tok = load_base_model(direct_cfg, cpu), load_tokenizer(direct_cfg)
    want = direct.state_dict()
    got = cached.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    chat = [{"role": "user", "content": "Reverse: apple river stone"}]
    assert cached_tok.apply_chat_template(chat, add_generation_prompt=True) == \
        direct_tok.apply_chat_template(chat, add_generation_prompt=True)
    assert (cached_tok.eos_token, cached_tok.pad_token) == (direct_tok.eos_token, direct_tok.pad_token)

    def no_more_conversions(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_more_conversions)
    assert resolve_source("smollm2-135m-instruct", str(tmp_path / "cache")) == (str(copy), {})


def test_unwritable_gguf_cache_is_a_clear_error_before_any_conversion(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ModelLoadError, match=r"model.gguf_cache_dir: can't write to .*not-a-folder.*set it to null"):
        load_tokenizer(ModelConfig(gguf_cache_dir=str(blocker)))
