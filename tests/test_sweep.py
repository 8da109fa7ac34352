"""`loratune sweep`: grid expansion and key checks before any trial, SPACE.yaml errors, a killed sweep resumed from
the interrupted trial's checkpoint, two workers on one SQLite file, pruning, and the table and sweep.html."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from badinput import run_cli
from conftest import QA, write_jsonl
from test_train import tiny_config

from loratune.config import ConfigError, config_to_dict
from loratune.plan.space import base_config, parse_grid, parse_space

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "LORATUNE_LOG": "INFO"}


@pytest.fixture
def config_file(tiny_gpt2_dir, tmp_path):
    """A tiny sweepable config: held-out data, an eval every 2 steps, a checkpoint every 2 steps."""
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = tiny_config(tiny_gpt2_dir, data, tmp_path / "runs" / "base", max_steps=6, eval_every=2, save_every=2,
                      report_to=[])
    cfg.data.datasets[0].eval_fraction = 0.25
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def sweep(args, cwd, env=ENV, **kw):
    return subprocess.run([sys.executable, "-m", "loratune", "sweep", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300, check=False, **kw)


def trials(sweep_dir):
    study = optuna.load_study(study_name="loratune-sweep", storage=f"sqlite:///{sweep_dir / 'sweep.db'}")
    return study.get_trials()


def test_grid_expands_every_combination_with_values_read_as_overrides(config_file):
    base = base_config(str(config_file), [])
    space = parse_grid(["lora.r=4,8", "train.lr=1e-4,5e-4", "method=lora,full"], base)
    assert space.params == {"lora.r": [4, 8], "train.lr": [1e-4, 5e-4], "method": ["lora", "full"]}
    assert space.trials == 8 and len(space.points()) == 8
    assert {"lora.r": 8, "train.lr": 5e-4, "method": "full"} in space.points()


@pytest.mark.parametrize("grid, needles", [
    ("lora.rr=4,8", ["--grid lora.rr=4,8", "unknown key 'lora.rr'", "did you mean 'lora.r'"]),
    ("train.learning_rate=1e-4", ["train.learning_rate", "unknown key"]),
    ("lora.r=4,0", ["--grid lora.r=4,0", "lora.r", "at least 1"]),
    ("method=lora,ful", ["method", "lora, full"]),
    ("lora.r", ["write KEY=V1,V2"]),
])
def test_a_bad_grid_fails_before_any_trial_or_model_load(config_file, grid, needles, monkeypatch):
    import loratune.model.load as model_load

    monkeypatch.setattr(model_load, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    code, out = run_cli(["sweep", str(config_file), "--grid", grid], config_file.parent)
    assert code != 0 and "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    assert not (config_file.parent / "runs" / "base-sweep").exists()  # nothing created


@pytest.mark.parametrize("text, needles", [
    ("train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}\nlora.rr: [4, 8]\n", ["space.yaml:2", "lora.rr", "lora.r"]),
    ("train.lr: {low: 0, high: 1.0e-3, log: true}\n", ["space.yaml:1", "log range needs low above 0"]),
    ("lora.r: {low: 8, high: 4}\n", ["space.yaml:1", "low 8 is above high 4"]),
    ("lora.r: {low: 0, high: 4}\n", ["space.yaml:1", "lora.r", "at least 1"]),
    ("lora.r: {lo: 1, high: 4}\n", ["space.yaml:1", "unknown: lo"]),
    ("train:\n  lr: {low: 1.0e-5, high: 1.0e-3}\n", ["space.yaml:1", "dotted keys", "train.lr"]),
    ("train.lr: fast\n", ["space.yaml:1", "a list of values or {low"]),
])
def test_space_yaml_errors_name_file_and_line(config_file, text, needles):
    space = config_file.parent / "space.yaml"
    space.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_space(space, base_config(str(config_file), []), trials=3)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_space_yaml_ranges_and_lists(config_file):
    space = config_file.parent / "space.yaml"
    space.write_text("train.lr: {low: 1e-5, high: 1.0e-3, log: true}\nlora.r: {low: 4, high: 16, step: 4}\n"
                     "method: [lora, full]\n")
    parsed = parse_space(space, base_config(str(config_file), []), trials=5)
    assert parsed.params["train.lr"] == {"low": 1e-5, "high": 1e-3, "log": True}
    assert parsed.params["method"] == ["lora", "full"] and parsed.trials == 5


def test_killed_sweep_resumes_the_interrupted_trial_from_its_checkpoint(config_file, tmp_path):
    sweep_dir = tmp_path / "sw"
    args = [str(config_file), "--grid", "lora.r=2,4", "--dir", str(sweep_dir), "--train.max_steps=8",
            "--train.save_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "sweep", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it once trial 0 has written its checkpoint at step 4
        while proc.poll() is None and not list(sweep_dir.glob("trial-000-*/checkpoints/step-000004")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [t.state.name for t in trials(sweep_dir)] == ["RUNNING"]
    done = sweep(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"trial \d+ \(resumes trial 0\)", done.stderr), done.stderr
    resumed_at = re.search(r"resumed from \S+trial-000-\S+ \(step (\d+)\)", done.stderr)
    assert resumed_at and int(resumed_at.group(1)) >= 4, done.stderr  # from the checkpoint, not step 0
    states = {t.number: (t.state.name, t.params["lora.r"], t.system_attrs.get("failed_trial"))
              for t in trials(sweep_dir)}
    # trial 0 failed for its dead worker; its retry (same run dir) resumed; each grid point completed once
    complete = sorted(p for s, p, _ in states.values() if s == "COMPLETE")
    assert states[0][0] == "FAIL" and complete == [2, 4]
    assert any(s == "COMPLETE" and f == 0 for s, _, f in states.values())
    run_dirs = sorted(p.name for p in sweep_dir.glob("trial-*"))
    assert len(run_dirs) == 2 and run_dirs[0].startswith("trial-000-")
    steps = [json.loads(line)["step"] for line in (sweep_dir / run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # one run, continued: not started over (that would log steps 1.. twice)


def test_two_workers_on_one_sqlite_file_never_run_a_trial_twice(config_file, tmp_path):
    sweep_dir = tmp_path / "sw"
    first = subprocess.Popen([sys.executable, "-m", "loratune", "sweep", str(config_file), "--grid", "lora.r=1,2,3",
                              "lora.alpha=8,16", "--dir", str(sweep_dir), "--train.max_steps=2"], cwd=tmp_path,
                             env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while first.poll() is None and not list(sweep_dir.glob("trial-000-*")):  # the sweep exists: join it
        time.sleep(0.05)
    joined = sweep(["--join", "--dir", str(sweep_dir)], tmp_path)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0 and joined.returncode == 0, err + joined.stderr
    ran = [t for t in trials(sweep_dir) if not t.user_attrs.get("skipped")]
    points = [tuple(sorted(t.params.items())) for t in ran]
    assert len(points) == 6 and len(set(points)) == 6  # 3 x 2 grid points, each trained once
    assert all(t.state.name == "COMPLETE" for t in ran)
    assert len({t.user_attrs["worker"] for t in ran}) == 2  # both workers took trials
    assert len(list(sweep_dir.glob("trial-*"))) == 6


def test_pruning_stops_a_clearly_bad_trial_and_leaves_a_valid_run(config_file, tmp_path):
    sweep_dir = tmp_path / "sw"
    code, out = run_cli(["sweep", str(config_file), "--grid", "train.lr=3e-2,2e-2,1e-9", "--prune", "on", "--dir",
                         str(sweep_dir)], tmp_path)
    assert code == 0, out
    states = [(t.params["train.lr"], t.state.name) for t in trials(sweep_dir)]
    assert states == [(3e-2, "COMPLETE"), (2e-2, "COMPLETE"), (1e-9, "PRUNED")]
    pruned = next(sweep_dir.glob("trial-002-*"))
    final = json.loads((pruned / "final_metrics.json").read_text())
    assert final["stopped"].startswith("pruned") and final["steps"] == 2  # of 6
    assert (pruned / "adapter_model.safetensors").is_file()  # a whole run: eval, report and chat work on it


def test_table_and_html_hold_the_trials_real_numbers(config_file, tmp_path):
    sweep_dir = tmp_path / "sw"
    code, out = run_cli(["sweep", str(config_file), "--grid", "method=lora,full", "--dir", str(sweep_dir)], tmp_path)
    assert code == 0, out
    page = (sweep_dir / "sweep.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for t in trials(sweep_dir):
        run = sweep_dir / t.user_attrs["run_dir"]
        final = json.loads((run / "final_metrics.json").read_text())
        best = min(e["eval_loss"] for e in json.loads((run / "eval_history.json").read_text()))
        assert t.value == pytest.approx(best)
        row = next(line for line in out.splitlines() if line.startswith(f"{t.number} "))
        assert f"method={t.params['method']}" in row and f"{final['trainable_parameters']:,}" in row
        assert f"{best:.4f}" in row and "complete" in row
        assert f"{best:.4f}" in page
    lora, full = (json.loads((next(sweep_dir.glob(f"trial-00{i}-*")) / "final_metrics.json").read_text())
                  for i in (0, 1))
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    best = min(trials(sweep_dir), key=lambda t: t.value)
    assert f"best: trial {best.number} " in out
    assert "time: " in out


def test_a_different_sweep_in_the_same_folder_or_a_join_to_nothing_is_refused(config_file, tmp_path):
    from loratune.plan.sweep import open_study

    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    open_study(f"sqlite:///{sweep_dir / 'sweep.db'}", parse_grid(["lora.r=2,4"], base_config(str(config_file), [])),
               join=False)
    code, out = run_cli(["sweep", str(config_file), "--grid", "lora.r=8,16", "--dir", str(sweep_dir)], tmp_path)
    assert code == 1 and "already holds a different sweep" in out and "--join" in out
    code, out = run_cli(["sweep", "--join", "--dir", str(tmp_path / "nothing")], tmp_path)
    assert code == 1 and "there is no sweep in" in out and not (tmp_path / "nothing").exists()
    assert not list(sweep_dir.glob("trial-*"))


def test_search_draws_within_the_ranges_and_a_rerun_adds_only_the_missing_trials(config_file, tmp_path):
    sweep_dir = tmp_path / "sw"
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\nlora.r: {low: 1, high: 8}\n")
    args = ["sweep", str(config_file), "--search", str(space), "--dir", str(sweep_dir), "--prune", "off",
            "--train.max_steps=2"]
    for n in (2, 3):  # then the same sweep, one trial more
        code, out = run_cli([*args, "--trials", str(n)], tmp_path)
        assert code == 0, out
    done = trials(sweep_dir)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3
    assert all(1e-3 <= t.params["train.lr"] <= 3e-2 and 1 <= t.params["lora.r"] <= 8 for t in done)
    assert len({t.params["train.lr"] for t in done}) == 3  # the rerun drew anew, not trial 0's values again
    assert isinstance(done[0].params["lora.r"], int)
    cfg = yaml.safe_load((sweep_dir / done[2].user_attrs["run_dir"] / "config.yaml").read_text())
    assert cfg["train"]["lr"] == done[2].params["train.lr"] and cfg["lora"]["r"] == done[2].params["lora.r"]


def test_train_on_eval_sees_each_eval_and_may_stop_the_run(tiny_gpt2_dir, tmp_path):
    from loratune.training.recipe import train

    cfg = tiny_config(tiny_gpt2_dir, write_jsonl(tmp_path / "qa.jsonl", QA), tmp_path / "run", max_steps=6,
                      eval_every=2, report_to=[])
    cfg.data.datasets[0].eval_fraction = 0.25
    seen = []

    def on_eval(step, metrics):
        seen.append((step, metrics["eval_loss"]))
        return "stopped by the caller" if step == 4 else None

    run_dir, final = train(cfg, on_eval=on_eval)
    history = json.loads((run_dir / "eval_history.json").read_text())
    assert seen == [(e["step"], e["eval_loss"]) for e in history] and [s for s, _ in seen] == [2, 4]
    assert final["stopped"] == "stopped by the caller" and final["steps"] == 4
    assert (run_dir / "adapter_model.safetensors").is_file()
