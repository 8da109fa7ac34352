"""--overwrite, --resume and output_dir as a user can get them wrong: nothing loratune did not write is deleted, and
each refusal says why before any model is loaded (tests/badinput.py checks exit code, message, no traceback and
that every file is byte-identical)."""

import argparse
import os
import shutil

import pytest
import torch
import yaml
from badinput import check_bad
from conftest import QA, write_jsonl
from test_train import tiny_config

from loratune.config import config_to_dict
from loratune.training.recipe import train
from loratune.training.rundir import MARKER


def config_file(work, model_dir, output_dir, **train_kw):
    data = write_jsonl(work / "qa.jsonl", QA)
    cfg = config_to_dict(tiny_config(model_dir, data, output_dir, report_to=[], **train_kw))
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    return work / "c.yaml"


def another_tools_project(folder):
    (folder / "src").mkdir(parents=True)
    (folder / "config.yaml").write_text("epochs: 3\n")  # another tool's config.yaml
    (folder / "paper.tex").write_text("\\documentclass{article}")
    (folder / "src" / "main.py").write_text("print('mine')\n")


@pytest.mark.parametrize("output_dir,prepare,needles", [
    ("project", lambda w: another_tools_project(w / "project"), ["project holds files but no loratune run", "nothing there was touched"]),
    (".", lambda w: (w / "notes.md").write_text("mine"), ["refuses output_dir .", "working directory"]),
    ("..", lambda w: None, ["refuses output_dir ..", "working directory or one of its parents"]),
    ("data", lambda w: (w / "data").mkdir() or shutil.copy(w / "qa.jsonl", w / "data" / "qa.jsonl"), []),
    ("file.txt", lambda w: (w / "file.txt").write_text("mine"), ["output_dir file.txt is a file"]),
])
def test_overwrite_refuses(output_dir, prepare, needles, tmp_path, tiny_gpt2_dir):
    work = tmp_path / "work"
    work.mkdir()
    config_file(work, tiny_gpt2_dir, output_dir)
    prepare(work)
    if output_dir == "data":  # the data the run reads lives there
        cfg = yaml.safe_load((work / "c.yaml").read_text())
        cfg["data"]["datasets"][0]["path"] = str(work / "data" / "qa.jsonl")
        (work / "c.yaml").write_text(yaml.safe_dump(cfg))
        needles = ["refuses output_dir data", "qa.jsonl, which this run reads"]
    check_bad(["train", "c.yaml", "--overwrite"], work, *needles, code=1)


def test_overwrite_refuses_the_folder_holding_the_config(tmp_path, tiny_gpt2_dir):
    work = tmp_path / "work"
    (work / "exp").mkdir(parents=True)
    config_file(work, tiny_gpt2_dir, "exp")
    shutil.move(work / "c.yaml", work / "exp" / "c.yaml")
    check_bad(["train", "exp/c.yaml", "--overwrite"], work, "refuses output_dir exp", "c.yaml, which this run reads",
              code=1)


def test_overwrite_refuses_home(tmp_path, tiny_gpt2_dir, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    config_file(tmp_path, tiny_gpt2_dir, str(home))
    check_bad(["train", "c.yaml", "--overwrite"], tmp_path, "home directory", code=1)


def test_output_dir_that_cannot_be_written(tmp_path, tiny_gpt2_dir, monkeypatch):
    config_file(tmp_path, tiny_gpt2_dir, "locked/run")
    (tmp_path / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("locked") else real(p, mode))
    check_bad(["train", "c.yaml"], tmp_path, "output_dir locked/run", "not writable", code=1)


@pytest.mark.parametrize("argv,needles", [
    (["--resume", "nowhere"], ["--resume nowhere", "no such directory"]),
    (["--resume", "notes"], ["--resume notes", "not a loratune run", "output_dir of an earlier"]),
])
def test_resume_of_something_else(argv, needles, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    check_bad(["train", *argv], tmp_path, *needles, code=1)


def test_a_pickled_optimizer_state_is_refused_not_unpickled(tmp_path, tiny_gpt2_dir):
    cfg = tiny_config(tiny_gpt2_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", max_steps=4,
                      save_every=2, report_to=[])
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    torch.save({"optimizer": argparse.Namespace(x=1)}, ckpt / "optimizer.pt")  # a Python object, not plain data
    (tmp_path / "run" / "final_metrics.json").unlink()
    out = check_bad(["train", "--resume", "run"], tmp_path, "optimizer.pt is refused", "weights_only=True",
                    code=1)
    assert "weights_only=False" not in out


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_gpt2_dir, caplog):
    cfg = tiny_config(tiny_gpt2_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", max_steps=6,
                      save_every=2, keep_checkpoints=3, report_to=[])
    _, reference = train(cfg)
    reference_adapter = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    run = tmp_path / "run"
    newest = run / "checkpoints" / "step-000006"
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled up
    (run / "final_metrics.json").unlink()
    with caplog.at_level("WARNING", logger="loratune"):
        _, final = train(cfg, resume=True)
    assert "step-000006 is damaged" in caplog.text and (run / "checkpoints" / ".damaged-step-000006").is_dir()
    assert final["steps"] == 6 and (run / "adapter_model.safetensors").read_bytes() == reference_adapter


def test_overwrite_replaces_a_run_only_after_the_new_one_started(tmp_path, tiny_gpt2_dir):
    cfg = tiny_config(tiny_gpt2_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", max_steps=2,
                      report_to=[])
    train(cfg)
    assert (tmp_path / "run" / MARKER).is_file()
    cfg.model.name = str(tmp_path / "no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        train(cfg, overwrite=True)  # a failed start: the old run is untouched
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    cfg.model.name = str(tiny_gpt2_dir)
    cfg.train.max_steps = 3
    _, final = train(cfg, overwrite=True)
    assert final["steps"] == 3 and not list(tmp_path.glob(".run.replaced-*"))
