"""Train the embedded SmolLM2-135M-Instruct for a handful of steps on the CPU, then load and chat."""

import io
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

import loratune
from loratune.inference.chat import chat_loop


@pytest.mark.slow
def test_embedded_model_trains_saves_and_chats(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--train.max_steps=3", "--train.batch_size=4",
                           "--train.lr=2e-3", f"--output_dir={run}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable of" in proc.stderr and "demo: 200 train / 43 held-out" in proc.stderr
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[-1]["loss"] < steps[0]["loss"]

    model, tok = loratune.load(run)
    assert isinstance(model, PeftModel) and model.base_model.model.config.model_type == "llama"
    out = io.StringIO()
    chat_loop(model, tok, max_new_tokens=8, stdin=io.StringIO("Greet Ada.\nexit\n"), stdout=out)
    assert out.getvalue().startswith("model> ") and len(out.getvalue()) > len("model> \n")
    with torch.no_grad():
        ids = tok("Hello", return_tensors="pt")
        assert torch.isfinite(model(**ids).logits).all()
