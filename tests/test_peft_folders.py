"""Adapters from elsewhere: a folder written by plain peft (get_peft_model + save_pretrained, no tokenizer, no
loratune config) works with generate, chat, merge, eval (with --file) and report, with the logits plain peft gives."""

import json

import pytest
import torch
from badinput import check_bad, run_cli
from conftest import QA, write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import loratune


@pytest.fixture
def peft_folder(tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")  # no tokenizer, no config.yaml: as a peft user leaves it
    write_jsonl(tmp_path / "qa.jsonl", [{"messages": [{"role": "user", "content": r["question"]},
                                                      {"role": "assistant", "content": r["answer"]}]} for r in QA])
    (tmp_path / "prompts.txt").write_text("What is 2 plus 3?\n")
    return tmp_path


def test_loratune_loads_a_plain_peft_adapter_with_the_same_logits(peft_folder, tiny_llama_dir):
    ours, tok = loratune.load(peft_folder / "adapter", device="cpu")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft_folder / "adapter")
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)


def test_commands_on_a_plain_peft_adapter(peft_folder):
    for argv in (["generate", "adapter", "--input", "prompts.txt", "--output", "out.jsonl", "--max_new_tokens", "4"],
                 ["merge", "adapter", "merged"],
                 ["eval", "adapter", "--file", "qa.jsonl", "--samples", "0"],
                 ["report", "adapter"]):
        code, text = run_cli(argv + (["--device", "cpu"] if argv[0] in ("generate", "eval") else []), peft_folder)
        assert code == 0, text
    assert json.loads((peft_folder / "out.jsonl").read_text())["output"] is not None
    assert (peft_folder / "merged" / "model.safetensors").is_file()
    assert (peft_folder / "adapter" / "report.html").is_file()
    code, text = run_cli(["chat", "adapter", "--device", "cpu", "--max_new_tokens", "3"], peft_folder, stdin="hi\n")
    assert code == 0 and "model>" in text, text


def test_eval_of_a_peft_adapter_needs_a_file(peft_folder):
    check_bad(["eval", "adapter"], peft_folder, "PEFT adapter", "pass --file", code=1)


def test_an_adapter_that_names_no_base_needs_base(peft_folder, tiny_llama_dir):
    config = peft_folder / "adapter" / "adapter_config.json"
    saved = json.loads(config.read_text())
    saved["base_model_name_or_path"] = None
    config.write_text(json.dumps(saved))
    check_bad(["generate", "adapter", "--input", "prompts.txt", "--output", "o.txt"], peft_folder, "names no base",
              "--base", code=1)
    code, text = run_cli(["generate", "adapter", "--input", "prompts.txt", "--output", "o.txt", "--base",
                          str(tiny_llama_dir), "--max_new_tokens", "3", "--device", "cpu"], peft_folder)
    assert code == 0, text


def test_an_explicit_template_for_an_adapter_from_elsewhere(peft_folder):
    code, text = run_cli(["generate", "adapter", "--input", "prompts.txt", "--output", "o.jsonl", "--template", "chatml",
                          "--max_new_tokens", "2", "--device", "cpu"], peft_folder)
    assert code == 0 and "neither the adapter nor its base has a chat template" not in text, text


def test_training_continues_an_adapter_from_elsewhere(peft_folder, tiny_llama_dir):
    from safetensors.torch import load_file
    from test_train import tiny_config

    start = load_file(peft_folder / "adapter" / "adapter_model.safetensors")
    cfg = tiny_config(tiny_llama_dir, write_jsonl(peft_folder / "qa2.jsonl", QA), peft_folder / "run", report_to=[],
                      max_steps=1, lr=1e-9, warmup_steps=0)
    cfg.model.adapter = str(peft_folder / "adapter")
    run_dir, _ = loratune.train(cfg)
    after = load_file(run_dir / "adapter_model.safetensors")
    assert {k.replace(".default", "") for k in after} == {k.replace(".default", "") for k in start}  # its r=4 q/v
    for key in start:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-6)  # one step at lr 1e-9: where it started


def test_model_adapter_must_be_an_adapter(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  adapter: nowhere\n")
    check_bad(["train", "c.yaml"], tmp_path, "c.yaml:2", "model.adapter", "adapter_config.json", code=1)


def test_files_of_the_users_own_in_a_peft_folder_are_not_replaced(peft_folder):
    (peft_folder / "adapter" / "report.html").write_text("my own report")
    (peft_folder / "adapter" / "eval-qa.json").write_text("{}")
    check_bad(["report", "adapter"], peft_folder, "report.html already exists", "did not make", code=1)
    check_bad(["eval", "adapter", "--file", "qa.jsonl"], peft_folder, "eval-qa.json already exists", "--out", code=1)


@pytest.mark.parametrize("targets, embeddings_saved", [(["q_proj", "v_proj"], False), (["q_proj", "embed_tokens"], True)])
def test_saving_an_adapter_never_asks_the_hub(tiny_llama_dir, tmp_path, monkeypatch, targets, embeddings_saved):
    """An adapter whose base is a hub id (as every run on the embedded model names it) is saved without peft asking
    the hub whether the vocabulary was resized (offline: a warning at every checkpoint, behind a firewall a wait);
    the embeddings are in the file exactly when the adapter targets them."""
    import peft.utils.save_and_load as peft_saving
    from safetensors import safe_open

    from loratune.training.checkpoint import save_weights

    def asked(*args, **kwargs):
        raise AssertionError(f"peft asked the hub: {args}")

    monkeypatch.setattr(peft_saving, "check_file_exists_on_hf_hub", asked)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules=targets))
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    save_weights(model, None, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys) == embeddings_saved, keys
