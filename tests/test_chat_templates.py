"""data.chat_template chooses the prompt format; the run keeps it, so every command renders prompts the same way."""

import pytest
from badinput import check_bad
from conftest import QA, write_jsonl
from test_train import tiny_config

import loratune
from loratune.config import DatasetConfig
from loratune.inference.generate import chat_prompt_ids

CHATS = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
         for r in QA]


@pytest.mark.parametrize("choice,marker", [("chatml", "<|im_start|>user\n"), ("plain", "User: "), ("file", "Q>> ")])
def test_the_run_keeps_the_template_it_trained_with(choice, marker, tiny_gpt2_dir, tmp_path):
    if choice == "file":
        (tmp_path / "t.jinja").write_text("{% for m in messages %}{% if m['role'] == 'user' %}Q>> {{ m['content'] }}\n"
                                          "{% else %}A>> {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                                          "{% if add_generation_prompt %}A>>{% endif %}")
        choice = str(tmp_path / "t.jinja")
    cfg = tiny_config(tiny_gpt2_dir, write_jsonl(tmp_path / "chats.jsonl", CHATS), tmp_path / "run", report_to=[],
                      max_steps=1)
    cfg.data.datasets = [DatasetConfig(path=str(tmp_path / "chats.jsonl"))]
    cfg.data.chat_template = choice
    cfg.data.max_length = 256  # byte tokens: ChatML's markers alone are 60
    run_dir, _ = loratune.train(cfg)
    _, tok = loratune.load(run_dir, device="cpu")
    rendered = tok.decode(chat_prompt_ids(tok, None, [{"role": "user", "content": "hi"}]))
    assert rendered.startswith(marker)


def test_a_template_that_is_not_there(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  chat_template: templates/mine.jinja\n")
    check_bad(["train", "c.yaml"], tmp_path, "c.yaml:2", "data.chat_template", "auto, chatml, plain", code=1)
