"""Start-up, the timing line, and the speed defaults that change what runs (not how fast: no timings here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from loratune import timing
from loratune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_version_import_no_heavy_library():
    code = """
import sys
from loratune.cli import main
for argv in (["--help"], ["--version"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"],
             ["merge", "--help"], ["chat", "--help"], ["sweep", "--help"], ["sweep", "--grid", "lora.rr=1"]):
    try:
        main(argv)
    except SystemExit:
        pass
import loratune
print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "loratune 0.1.0" in out
    assert "config keys" in out  # train --help still lists the config reference
    assert out.strip().splitlines()[-1] == "[]"


def test_phases_report_their_own_time(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0, 10.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    phases = timing.Phases()
    with phases("loop"):  # 0 .. 10, of which 1 .. 3 is a checkpoint
        with phases("save"):
            pass
    with phases("save"):  # 10 .. 10.5
        pass
    assert phases.seconds == {"save": 2.5, "loop": 8.0}
    assert phases.summary(total=12.0) == "save 2.5 s · loop 8.0 s · other 1.5 s · total 12.0 s"


def test_train_prints_where_the_time_went(tiny_llama_dir, qa_file, tmp_path, capsys):
    cfg = {"model": {"name": str(tiny_llama_dir)},
           "data": {"datasets": [{"path": str(qa_file), "format": "completion", "eval_fraction": 0.2,
                                  "fields": {"prompt": "question", "response": "answer"}}], "cache_dir": None},
           "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "report_to": []},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("time: ")][-1]
    names = [part.rsplit(" ", 2)[0] for part in line.removeprefix("time: ").split(" · ")]
    assert names[0] == "import" and names[-1] == "total"  # phases under 0.05 s are left out of the line
    assert {"import", "data", "model", "loop", "eval", "save"} <= set(timing.phases.seconds)
    assert set(names) - {"other", "total"} <= set(timing.phases.seconds)


def test_generation_bytes_count_the_cache_of_every_layer(tiny_llama_dir):
    from transformers import AutoConfig

    from loratune.inference.batch import generation_bytes

    c = AutoConfig.from_pretrained(tiny_llama_dir)
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    one, two = generation_bytes(c, 2, 100), generation_bytes(c, 2, 200)
    # Doubling the length doubles everything but the logits; the cache is held twice while it grows.
    assert two - one == 100 * (2 * kv_per_token + (3 * c.intermediate_size + 6 * c.hidden_size) * 2)
    assert generation_bytes(c, 4, 100) - one == 100 * (2 * kv_per_token + (3 * c.intermediate_size + 6 * c.hidden_size) * 2)


@pytest.mark.parametrize("arch", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_every_batch_layout_gives_the_plain_forwards_loss_and_gradients(arch, request, monkeypatch):
    """One row without padding (with and without the shared prefix once) and padded rows continuing a shared
    prefix's cache: the loss and gradients of the plain padded forward, from fewer tokens through the model."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from loratune.config import LoraConfig
    from loratune.data.examples import IGNORE, Example, collate
    from loratune.model import loss
    from loratune.model.load import prepare_for_training, unwrap_causal_lm

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), dtype=torch.float32)
    # eval(): no dropout (tiny GPT-2 has some), so every layout computes the same function
    model = prepare_for_training(model, "lora", LoraConfig(r=4, dropout=0.0, target_modules="all-linear")).eval()
    prefix = [40, 41, 42, 43, 44, 45, 46]
    rows = [[50, 51, 52, 53], [60, 61, 62, 63, 64, 65, 66], [70, 71, 72]]
    examples = [Example(prefix + r, [IGNORE] * (len(prefix) + 1) + r[1:], {}) for r in rows]
    batch = collate(examples, pad_id=0)
    assert loss.shared_prefix_len(batch) == len(prefix)
    causal_lm = unwrap_causal_lm(model)
    seen = []
    causal_lm.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(nll_fn):
        seen.clear()
        for p in params:
            p.grad = None
        nll = nll_fn()
        nll.backward()
        return nll.detach(), [p.grad.clone() for p in params], sum(seen)

    def plain():
        logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")

    reference, reference_grads, _ = run(plain)
    real = int(batch["attention_mask"].sum())
    layouts = {"one row, prefix once": (True, 1024, real - 2 * len(prefix)), "one row": (False, 1024, real),
               "padded, prefix cache": (True, 0, batch["input_ids"].numel() - 2 * len(prefix))}
    for name, (share, cap, tokens) in layouts.items():
        monkeypatch.setattr(loss, "ONE_ROW_MAX_TOKENS", cap)
        nll, grads, through = run(lambda: loss.sum_token_nll(model, batch, share_prefix=share)[0])
        assert through == tokens, name
        torch.testing.assert_close(nll, reference, rtol=1e-5, atol=1e-5, msg=name)
        for a, b in zip(grads, reference_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_no_shared_prefix_where_a_shared_token_trains():
    from loratune.data.examples import IGNORE, Example, collate
    from loratune.model.loss import shared_prefix_len

    same = [1, 2, 3, 4, 5, 6]
    examples = [Example(same + [7], [IGNORE, IGNORE, IGNORE, 4, 5, 6, 7], {}), Example(same + [8], [IGNORE] * 6 + [8], {})]
    assert shared_prefix_len(collate(examples, pad_id=0)) == 2  # position 2 predicts token 3, which trains
