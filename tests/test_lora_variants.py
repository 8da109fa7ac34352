"""LoRA variants peft implements, as config keys: each trains, saves, and loads back in plain peft with the logits
loratune's own loading gives."""

import pytest
import torch
from conftest import QA, write_jsonl
from peft import PeftModel
from test_train import tiny_config
from transformers import AutoModelForCausalLM

import loratune

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian init": {"init": "gaussian"},
    "pissa init": {"init": "pissa"},
    "olora init": {"init": "olora"},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "some layers": {"layers": [1]},
    "rank pattern": {"rank_pattern": {"q_proj": 2}},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_and_loads_in_plain_peft(name, tiny_llama_dir, tmp_path):
    cfg = tiny_config(tiny_llama_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", report_to=[],
                      max_steps=2, lr=0.05)
    for key, value in VARIANTS[name].items():
        setattr(cfg.lora, key, value)
    run_dir, final = loratune.train(cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ours, _ = loratune.load(run_dir, device="cpu")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)
        assert not torch.allclose(base(ids).logits, expected)  # the adapter changed something
    saved = plain.peft_config["default"]
    if name == "dora":
        assert saved.use_dora
    if name == "some layers":
        assert all(".layers.1." in n for n, _ in plain.named_parameters() if "lora_A" in n)
    if name == "rank pattern":
        q = next(p for n, p in plain.named_parameters() if "q_proj.lora_A" in n)
        assert q.shape[0] == 2


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_original_base_is_the_trained_model(init, tiny_llama_dir, tmp_path):
    """PiSSA/OLoRA train on a changed base; the saved adapter, converted, must give the trained model on the original
    base: the held-out loss measured in training (changed base) equals the one `evaluate` measures (original base)."""
    import json
    import math

    cfg = tiny_config(tiny_llama_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", report_to=[],
                      max_steps=2, lr=0.05, eval_every=2)
    cfg.lora.init = init
    cfg.data.datasets[0].eval_fraction = 0.25
    run_dir, _ = loratune.train(cfg)
    in_training = json.loads((run_dir / "eval_history.json").read_text())[-1]["eval_loss"]
    after = loratune.evaluate(run_dir, device="cpu", samples=0)[str(run_dir)]["perplexity"]
    assert math.log(after) == pytest.approx(in_training, rel=1e-4)
