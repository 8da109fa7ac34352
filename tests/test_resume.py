"""Checkpoints, exact resume after SIGKILL (bitwise on CPU), graceful SIGINT/SIGTERM, eval and early stopping."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import losses, tiny_config

from loratune.config import TrainConfig, config_to_dict
from loratune.training.checkpoint import completed_checkpoints
from loratune.training.options import lr_lambda, param_groups
from loratune.training.recipe import TrainingError, train

DRIVER = Path(__file__).with_name("resume_driver.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def resumable_config(model_dir, data, out, **kw):
    cfg = tiny_config(model_dir, data, out, **{"max_steps": 12, "save_every": 3, "keep_checkpoints": 2,
                                               "resume": "auto", "report_to": [], **kw})
    cfg.lora.dropout = 0.1  # dropout draws from the torch RNG, so resume must restore it exactly
    return cfg


def write_config(cfg, path):
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return str(path)


def adapter_bytes(run_dir):
    return (run_dir / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    from conftest import QA, write_jsonl

    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    run_dir, _ = train(resumable_config(tiny_llama_dir, data, tmp / "run"))
    return data, losses(run_dir), adapter_bytes(run_dir)


def kill_when_logged(proc, run_dir, n_lines):
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n_lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)


@pytest.mark.parametrize("kill", ["after step 5", "after step 10", "inside checkpoint 6"])
def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(kill, reference, tiny_llama_dir, tmp_path):
    data, ref_losses, ref_adapter = reference
    run = tmp_path / "run"
    cfg = resumable_config(tiny_llama_dir, data, run)
    config_file = write_config(cfg, tmp_path / "c.yaml")
    extra = [kill.split()[-1]] if kill.startswith("inside") else []
    proc = subprocess.Popen([sys.executable, str(DRIVER), config_file, *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not extra:
        kill_when_logged(proc, run, int(kill.split()[-1]))
    else:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "adapter_model.safetensors").exists()  # the killed run never finished
    if extra:
        assert list((run / "checkpoints").glob(".tmp-step-000006-*"))  # killed mid-write: only a temp dir
        assert [c.name for c in completed_checkpoints(run)] == ["step-000003"]

    run_dir, final = train(cfg)  # resume: auto picks up the newest finished checkpoint
    assert final["steps"] == 12
    assert losses(run_dir) == ref_losses  # bitwise: exact float equality, step by step
    assert adapter_bytes(run_dir) == ref_adapter
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert [c.name for c in completed_checkpoints(run)] == ["step-000009", "step-000012"]  # keep last 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_finishes_the_step_checkpoints_and_exits_0(sig, reference, tiny_llama_dir, tmp_path):
    data, ref_losses, ref_adapter = reference
    run = tmp_path / "run"
    cfg = resumable_config(tiny_llama_dir, data, run, save_every=0)
    config_file = write_config(cfg, tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "train", config_file], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The CLI has no sleep hook: wait for the first step, then interrupt (the run takes a few seconds).
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    done = completed_checkpoints(run)
    if (run / "adapter_model.safetensors").exists():
        pytest.skip("the run finished before the signal arrived")
    assert f"{sig.name} received at step" in err and f"loratune train --resume {run}" in err
    assert len(done) == 1 and int(done[0].name.split("-")[1]) < 12
    subprocess.run([sys.executable, "-m", "loratune", "train", "--resume", str(run)], env=ENV, check=True,
                   capture_output=True, timeout=120)
    assert losses(run) == ref_losses and adapter_bytes(run) == ref_adapter


def test_resume_without_checkpoint_is_a_clear_error(tiny_llama_dir, qa_file, tmp_path):
    from loratune.training.rundir import RunDirError

    with pytest.raises(RunDirError, match="there is no run there to resume"):
        train(resumable_config(tiny_llama_dir, qa_file, tmp_path / "nothing"), resume=True)


def test_periodic_eval_history_best_checkpoint_and_early_stopping(tiny_llama_dir, qa_file, tmp_path):
    cfg = resumable_config(tiny_llama_dir, qa_file, tmp_path / "run", max_steps=40, save_every=0, eval_every=2,
                           lr=0.3, early_stopping_patience=2, keep_checkpoints=1)
    cfg.data.datasets[0].eval_fraction = 0.25
    run_dir, final = train(cfg)
    history = json.loads((run_dir / "eval_history.json").read_text())
    assert [h["step"] for h in history] == list(range(2, 2 * len(history) + 1, 2))
    assert final["stopped"].startswith("early stopping") and final["steps"] < 40
    best = min(history, key=lambda h: h["eval_loss"])
    assert final["best_checkpoint"] == f"step-{best['step']:06d}" and final["best"] == best["eval_loss"]
    kept = [c.name for c in completed_checkpoints(run_dir)]
    assert final["best_checkpoint"] in kept and f"step-{final['steps']:06d}" in kept  # best survives pruning
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_llama_dir, qa_file, tmp_path, monkeypatch):
    from loratune.model import loss as loop

    calls = {"n": 0}
    real = loop.sum_token_nll

    def poisoned(model, batch, *args, **kwargs):
        calls["n"] += 1
        nll, n = real(model, batch, *args, **kwargs)
        return (nll * math.nan if calls["n"] == 5 else nll), n

    monkeypatch.setattr(loop, "sum_token_nll", poisoned)
    cfg = resumable_config(tiny_llama_dir, qa_file, tmp_path / "run", save_every=2)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; stopping. Last good checkpoint: .*step-000004"):
        train(cfg)
    assert [c.name for c in completed_checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]


def test_schedules_with_warmup_ratio():
    def lrs(schedule):
        f = lr_lambda(TrainConfig(schedule=schedule, warmup_ratio=0.2, min_lr_ratio=0.0), 10)
        return [round(f(s), 4) for s in range(10)]

    assert lrs("constant") == [0.5, 1.0] + [1.0] * 8
    assert lrs("linear")[2:] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lrs("cosine")[2] == 1.0 and lrs("cosine")[6] == 0.5 and lrs("cosine")[9] < 0.05
    with pytest.raises(ValueError, match="train.schedule: 'cosin' should be one of cosine, linear, constant"):
        lr_lambda(TrainConfig(schedule="cosin"), 10)


def test_weight_decay_skips_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias, norm weight and bias


def test_gradient_checkpointing_trains_the_adapter_identically(tiny_llama_dir, qa_file, tmp_path):
    plain, _ = train(tiny_config(tiny_llama_dir, qa_file, tmp_path / "a", report_to=[]))
    ckpt, _ = train(tiny_config(tiny_llama_dir, qa_file, tmp_path / "b", report_to=[], gradient_checkpointing=True))
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-6)
    assert losses(ckpt)[-1] < losses(ckpt)[0]


def test_fp16_on_cpu_and_unknown_tracker_are_clear_errors(tiny_llama_dir, qa_file, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(tiny_config(tiny_llama_dir, qa_file, tmp_path / "a", precision="fp16"))
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        train(tiny_config(tiny_llama_dir, qa_file, tmp_path / "b", report_to=["tensorbord"]))


def test_full_fine_tuning_trains_resumes_and_evaluates(reference, tiny_llama_dir, tmp_path):
    import loratune
    from loratune.evaluation.compare import evaluate

    data = reference[0]
    cfg = resumable_config(tiny_llama_dir, data, tmp_path / "full", max_steps=6, save_every=2, lr=1e-3)
    cfg.method = "full"
    cfg.data.datasets[0].eval_fraction = 0.25
    uninterrupted, _ = train(cfg)
    assert (uninterrupted / "model.safetensors").is_file() and not (uninterrupted / "adapter_config.json").exists()

    # Resume a copy from its step-4 checkpoint (after removing the later one): same losses, same weights.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000006")
    (copy / "model.safetensors").unlink()
    cfg.output_dir = str(copy)
    resumed, _ = train(cfg)
    assert losses(resumed) == losses(uninterrupted)
    assert (resumed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()

    model, _ = loratune.load(uninterrupted, device="cpu")
    assert all(p.requires_grad for p in model.parameters())  # a plain transformers model, no adapter
    results = evaluate(uninterrupted, device="cpu", samples=0)
    assert results["base"]["perplexity"] != results[str(uninterrupted)]["perplexity"]


@pytest.mark.parametrize("packing", [False, True])
def test_generation_metrics_during_training(tiny_llama_dir, qa_file, tmp_path, packing):
    cfg = resumable_config(tiny_llama_dir, qa_file, tmp_path / "run", max_steps=4, save_every=0, eval_every=2,
                           generate_every_evals=2, generate_samples=3)
    cfg.data.datasets[0].eval_fraction = 0.25
    cfg.data.packing = packing
    cfg.eval.max_new_tokens = 4
    run_dir, _ = train(cfg)
    first, second = json.loads((run_dir / "eval_history.json").read_text())
    assert "gen/exact_match" not in first  # every 2nd eval only
    assert {"gen/exact_match", "gen/bleu", "gen/rougeL", "gen/length_ratio"} <= set(second)
    assert 0.0 <= second["gen/exact_match"] <= 1.0
