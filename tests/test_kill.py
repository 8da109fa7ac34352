"""SIGKILL at any moment leaves a run that continues to the same result: before the first checkpoint, between
checkpoints, and during the final save; continued with `loratune train --resume` and with `train.resume: auto`.
The comparison is bitwise (CPU): the adapter file, the per-step losses, and the final metrics but the wall time."""

import json
import random
import signal
import subprocess
import sys

import pytest
from test_resume import DRIVER, ENV, adapter_bytes, kill_when_logged, resumable_config, write_config
from test_train import losses

from loratune.training.recipe import train

# Seeded, so a failure reproduces: two random steps between checkpoints, besides the fixed edge cases below.
RANDOM_STEPS = sorted(random.Random(13).sample(range(2, 12), 2))


def final_metrics(run_dir):
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {k: v for k, v in final.items() if k not in ("train_seconds", "peak_gpu_gib")}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    from conftest import QA, write_jsonl

    tmp = tmp_path_factory.mktemp("kill-reference")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    run_dir, _ = train(resumable_config(tiny_llama_dir, data, tmp / "run", save_every=4))
    return data, losses(run_dir), adapter_bytes(run_dir), final_metrics(run_dir)


def killed_run(reference, tiny_llama_dir, tmp_path, where: str):
    """Start the run in a child process and SIGKILL it at `where`: 'step N' (after N steps are logged) or 'final'."""
    data = reference[0]
    run = tmp_path / "run"
    cfg = resumable_config(tiny_llama_dir, data, run, save_every=4)
    config_file = write_config(cfg, tmp_path / "c.yaml")
    extra = ["final"] if where == "final" else []
    proc = subprocess.Popen([sys.executable, str(DRIVER), config_file, *extra], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if where == "final":
        proc.wait(timeout=120)
    else:
        kill_when_logged(proc, run, int(where.split()[1]))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return cfg, config_file, run


def assert_same_as_reference(reference, run):
    _, ref_losses, ref_adapter, ref_final = reference
    assert losses(run) == ref_losses
    assert adapter_bytes(run) == ref_adapter
    assert final_metrics(run) == ref_final
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("where", ["step 2", *(f"step {s}" for s in RANDOM_STEPS), "final"])
def test_kill_then_resume_auto(where, reference, tiny_llama_dir, tmp_path):
    cfg, _, run = killed_run(reference, tiny_llama_dir, tmp_path, where)
    if where == "final":
        assert list(run.glob(".tmp-*"))  # what the kill left: the final save's temporary folder
    train(cfg)  # resume: auto
    assert_same_as_reference(reference, run)


@pytest.mark.parametrize("where", ["step 2", "final"])
def test_kill_then_resume_from_the_command_line(where, reference, tiny_llama_dir, tmp_path):
    _, _, run = killed_run(reference, tiny_llama_dir, tmp_path, where)
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--resume", str(run)], env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_as_reference(reference, run)


def test_resuming_a_finished_run_changes_nothing(reference, tiny_llama_dir, tmp_path):
    data = reference[0]
    cfg = resumable_config(tiny_llama_dir, data, tmp_path / "run", save_every=4)
    run, _ = train(cfg)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _, final = train(cfg, resume=True)
    assert final["steps"] == 12 and final["train_loss"] == reference[1][-1] and final["tokens"] > 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
