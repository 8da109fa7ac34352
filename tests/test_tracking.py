"""Trackers: metrics.jsonl and curves.png always; TensorBoard when installed; W&B and MLflow through report_to.
W&B and MLflow are not dependencies, so stand-in modules record what loratune calls on them."""

import json
import sys
import types

import pytest

from loratune.training.tracking import Tracker


def test_metrics_and_curves(tmp_path):
    tracker = Tracker(tmp_path, [], {"a": 1})
    for step in range(1, 4):
        tracker.log_train({"step": step, "loss": 3.0 / step, "lr": 1e-3, "tokens": step * 10, "tokens_per_s": 5.0})
    tracker.log_eval(3, {"eval_loss": 1.5})
    tracker.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((tmp_path / "eval_history.json").read_text()) == [{"step": 3, "eval_loss": 1.5}]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    tracker = Tracker(tmp_path, [], {}, resume_step=1)
    tracker.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = Tracker(tmp_path, ["tensorboard"], {})
    tracker.log_train({"step": 1, "loss": 2.0, "lr": 1e-3, "tokens": 10, "tokens_per_s": 5.0})
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_and_mlflow_receive_metrics(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda metrics, step: calls.append(("wandb.log", step, metrics)),
                                finish=lambda: calls.append(("wandb.finish",)))
    wandb = types.SimpleNamespace(init=lambda **kw: calls.append(("wandb.init", kw["project"])) or run)
    mlflow = types.SimpleNamespace(
        set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)) or types.SimpleNamespace(
            info=types.SimpleNamespace(run_id="mlflow-1")),
        log_params=lambda params: calls.append(("mlflow.params", params)),
        log_metrics=lambda metrics, step: calls.append(("mlflow.metrics", step, metrics)),
        end_run=lambda: calls.append(("mlflow.end",)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    tracker = Tracker(tmp_path, ["wandb", "mlflow"], {"train": {"lr": 0.1}})
    tracker.log_train({"step": 1, "loss": 2.0, "lr": 0.1, "tokens": 10, "tokens_per_s": 5.0})
    tracker.log_eval(1, {"eval_loss": 1.0})
    tracker.close()
    assert ("wandb.init", "loratune") in calls and ("mlflow.params", {"train.lr": "0.1"}) in calls
    assert ("wandb.log", 1, {"eval/eval_loss": 1.0}) in calls
    assert ("mlflow.metrics", 1, {"train_loss": 2.0, "train_lr": 0.1, "train_tokens_per_s": 5.0}) in calls
    assert calls[-2:] == [("wandb.finish",), ("mlflow.end",)]


def test_asking_for_a_tracker_that_is_not_installed_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ValueError, match="wandb, which is not installed: pip install wandb"):
        Tracker(tmp_path, ["wandb"], {})


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def log_steps(tracker, steps):
        for step in steps:
            tracker.log_train({"step": step, "loss": float(step), "lr": 1e-3, "tokens": step, "tokens_per_s": 1.0})
        tracker.close()

    log_steps(Tracker(tmp_path, ["tensorboard"], {}), range(1, 9))  # killed after step 8, last checkpoint at 4
    log_steps(Tracker(tmp_path, ["tensorboard"], {}, resume_step=4), range(5, 13))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))  # 12 points for 12 steps


def test_wandb_and_mlflow_resume_continue_the_same_run(tmp_path, monkeypatch):
    inits, starts = [], []
    run = types.SimpleNamespace(log=lambda metrics, step: None, finish=lambda: None)
    wandb = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run)
    mlflow = types.SimpleNamespace(
        set_experiment=lambda name: None, log_params=lambda params: None, log_metrics=lambda metrics, step: None,
        end_run=lambda: None,
        start_run=lambda **kw: starts.append(kw) or types.SimpleNamespace(info=types.SimpleNamespace(run_id="ml-7")))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    Tracker(tmp_path, ["wandb", "mlflow"], {}).close()
    Tracker(tmp_path, ["wandb", "mlflow"], {}, resume_step=3).close()
    assert inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert starts == [{"run_name": tmp_path.name}, {"run_id": "ml-7"}]
