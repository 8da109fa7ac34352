"""The model card a run carries, and `loratune push` up to the network call (the hub can't be reached here): what it
would upload, and the clear errors for a missing token, an unreachable hub and a run that is not finished."""

import sys
import types

from badinput import check_bad, run_cli
from huggingface_hub import ModelCard

import loratune.export.push as push_module


def test_the_run_carries_a_real_model_card(tiny_run):
    card = ModelCard.load(tiny_run / "README.md")
    assert card.data.base_model and card.data.library_name == "peft" and "loratune" in card.data.tags
    text = card.text
    assert "r=4, alpha=8" in text and "## Data mix" in text and "train /" in text  # the mix with its counts
    assert "| steps | 3 |" in text and "train_loss" in text and "loratune 0.1.0" in text


def test_push_uploads_the_adapter_tokenizer_card_and_config(tiny_run, tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls["upload"] = kw

    monkeypatch.setattr(push_module.hub, "unreachable", lambda: None)
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(HfApi=FakeApi, get_token=lambda: "hf_test"))
    code, text = run_cli(["push", str(tiny_run), "me/my-adapter", "--private"], tmp_path)
    assert code == 0, text
    assert calls["create"] == ("me/my-adapter", True, True)
    sent = calls["upload"]["allow_patterns"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "config.yaml", "tokenizer.json"} <= set(sent)
    assert not any(name.startswith(("checkpoints", "metrics", ".")) for name in sent)


def test_push_without_a_token_says_how_to_log_in(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=None, get_token=lambda: None))
    check_bad(["push", str(tiny_run), "me/x"], tmp_path, "no Hugging Face token", "hf auth login", code=1)


def test_push_to_an_unreachable_hub_uploads_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(push_module.hub, "unreachable", lambda: "http://127.0.0.1:9 did not answer")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=None, get_token=lambda: "hf_x"))
    check_bad(["push", str(tiny_run), "me/x"], tmp_path, "can't be reached", "nothing was uploaded", code=1)


def test_push_of_an_unfinished_run(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "run" / "adapter_model.safetensors").unlink()
    check_bad(["push", "run", "me/x"], tmp_path, "no final weights", "--resume", code=1)
