"""`loratune sweep`: many runs of one config over a grid or a search space, each an ordinary run directory.

The sweep's state lives in an Optuna storage (SQLite in the sweep folder by default; any database URL lets several
machines work on one sweep). Each worker takes the next trial, trains it with `train()` into
SWEEP_DIR/trial-NNN-SETTINGS, and tells the storage how it went. A worker that dies leaves its trial RUNNING; the
next worker to start finds it (its process is gone on this host, or its heartbeat stopped on another) and
retries it in the same run directory, from its newest checkpoint (train.resume: auto).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .space import Space, is_int_range, short, trial_config

log = logging.getLogger("loratune")

STUDY = "loratune-sweep"
HEARTBEAT_S = 10  # a worker on another machine counts as gone after GRACE_S without a heartbeat
GRACE_S = 60


def open_study(storage_url: str, space: Optional[Space], join: bool):
    """The sweep's study: created with `space`, continued when it already holds the same sweep, or (join) taken as
    it is. Returns (study, space)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress
    # Heartbeats with ask/tell (not study.optimize) are what a sweep needs: a trial outlives the worker that asked
    # for it. Optuna warns about that, and that stale-trial recovery is experimental.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)  # same settings, same run dir
    storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                         heartbeat_stale_trial_callback=retry)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if join and STUDY not in names:
        raise ConfigError(f"--join: {storage_url} holds no sweep yet; start one without --join")
    stored, n_trials = None, 0
    if STUDY in names:
        loaded = optuna.load_study(study_name=STUDY, storage=storage)
        stored, n_trials = Space(**loaded.user_attrs["space"]), len(loaded.trials)
    if stored and space and not join and (stored.kind, stored.params, stored.base) != (space.kind, space.params,
                                                                                      space.base):
        raise ConfigError(f"{storage_url} already holds a different sweep (over {', '.join(stored.params)}); give a "
                          "new --dir for this one, or add --join to work on the stored one as it is")
    space = space or stored  # the same sweep with another --trials: the new count
    if space.kind == "grid":
        sampler = _ordered_grid(space)
    else:
        # A new sweep draws as train.seed says. A restarted or joining worker must not draw what the first one did
        # (TPE's first trials are random): its seed moves with the trials stored, and a joining worker's pid.
        seed = space.base["train"]["seed"] + n_trials + (os.getpid() if join else 0)
        sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    study.set_user_attr("space", dataclasses.asdict(space))
    return study, space


def _ordered_grid(space: Space):
    """Optuna's GridSampler, with the points in the order given (trial 0 is the first combination; GridSampler
    shuffles them) and no study.stop() after a trial, which works only inside study.optimize: the sweep's loop
    stops by counting what is left."""
    from optuna.samplers import GridSampler

    class OrderedGrid(GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    sampler = OrderedGrid(space.params)
    # GridSampler's points are tuples of values by sorted key; put them in the order of Space.points().
    order = {repr(tuple(point[k] for k in sorted(point))): i for i, point in enumerate(space.points())}
    sampler._all_grids.sort(key=lambda grid: order[repr(tuple(grid))])
    return sampler


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover(study) -> None:
    """Trials left RUNNING by a worker that is gone are failed and queued again (same settings, same run
    directory): at once for a dead process of this host, after the heartbeat's grace period for other hosts."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        who = t.user_attrs.get("worker", "")
        if t.user_attrs.get("worker_trial") != t.number:  # a retry just taken: it holds its failed trial's worker
            continue
        if who.rpartition(":")[0] == host and not _alive(int(who.rpartition(":")[2])):
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(t._trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
                pass
    optuna.storages.fail_stale_trials(study)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return pid != os.getpid()  # a trial marked with our own pid is from an earlier process that had it


def counted(study) -> list:
    """The trials that count toward the sweep: not those failed for a dead worker and queued again, not duplicates
    a race between workers created and skipped."""
    retried = {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
    return [t for t in study.get_trials(deepcopy=False)
            if t.number not in retried and not t.user_attrs.get("skipped")]


def left(study, space: Space) -> int:
    """Trials still to start: grid points no trial holds, or search trials short of --trials (queued retries
    count as still to start)."""
    from optuna.trial import TrialState

    trials = counted(study)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if space.kind == "grid":  # GridSampler marks each trial with the grid point (grid_id) it took; a retry keeps it
        held = {t.system_attrs.get("grid_id") for t in trials} - {None}
        return waiting + space.trials - len(held)
    return waiting + max(space.trials - len(trials), 0)


def settings_of(trial, space: Space) -> dict:
    """Ask the sampler for this trial's value of each key."""
    out = {}
    for key, spec in space.params.items():
        if space.kind == "grid" or isinstance(spec, list):
            out[key] = trial.suggest_categorical(key, spec)
        elif is_int_range(spec):
            out[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"])
        else:
            out[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec["log"])
    return out


def run_name(number: int, settings: dict) -> str:
    """trial-003-lora.r=8,train.lr=0.0001; '/' never appears (a value holding one is cut to its last part)."""
    text = ",".join(f"{k}={short(v)}" for k, v in settings.items()).replace("/", "_")
    return f"trial-{number:03d}-{text}"[:120]


def stored(study, trial):
    """The trial as the storage holds it (with the system attrs: grid point, retry history)."""
    return study._storage.get_trial(trial._trial_id)


def is_duplicate(study, trial) -> bool:
    """Two workers asking at the same moment for the last grid point can both get it: the later one skips it."""
    attrs = stored(study, trial).system_attrs
    grid_id = attrs.get("grid_id")
    lineage = set(attrs.get("retry_history", []))
    return grid_id is not None and any(t.number < trial.number and t.number not in lineage
                                       and t.system_attrs.get("grid_id") == grid_id for t in counted(study))


def run_sweep(space: Optional[Space], sweep_dir: Path, storage_url: str, join: bool, prune: Optional[bool]):
    """Work on the sweep until no trial is left to start; returns (study, space). Ctrl-C or a kill leaves the
    trial in hand RUNNING: the next worker resumes it from its checkpoint."""
    from tqdm.auto import tqdm

    if join and storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--join: there is no sweep in {sweep_dir} (no {storage_url.removeprefix('sqlite:///')}); "
                          "start one without --join")  # before SQLite creates an empty database there
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study, space = open_study(storage_url, space, join)
    prune = space.kind == "search" if prune is None else prune
    finished = sum(t.state.is_finished() for t in counted(study))
    bar = tqdm(total=space.trials, initial=finished, desc="sweep", unit="trial", dynamic_ncols=True)
    while True:
        recover(study)
        if left(study, space) <= 0:
            break
        trial = study.ask()
        if is_duplicate(study, trial):
            _skip(study, trial)
            continue
        run_trial(study, trial, space, sweep_dir, prune)
        bar.update(1)
    bar.close()
    return study, space


def _skip(study, trial) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("skipped", "another worker took the same grid point")
    study.tell(trial, state=TrialState.FAIL)


def run_trial(study, trial, space: Space, sweep_dir: Path, prune: bool) -> None:
    """Train one trial into its run directory (a retried trial: the directory and checkpoint of the one it
    retries) and tell the storage: COMPLETE with the best held-out loss, PRUNED, or FAIL with the error."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses; ask/tell has none
    from optuna.trial import TrialState

    from ..training.recipe import train

    settings = settings_of(trial, space)
    name = trial.user_attrs.get("run_dir") or run_name(trial.number, settings)  # a retry inherits the user attrs
    trial.set_user_attr("run_dir", name)
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("worker_trial", trial.number)
    retried = stored(study, trial).system_attrs.get("failed_trial")
    log.info("trial %d%s: %s -> %s", trial.number, f" (resumes trial {retried})" if retried is not None else "",
             ", ".join(f"{k}={short(v)}" for k, v in settings.items()), sweep_dir / name)

    def on_eval(step: int, metrics: dict) -> Optional[str]:
        trial.report(metrics["eval_loss"], step)
        if prune and trial.should_prune():
            return f"pruned by the sweep at step {step}: eval_loss {metrics['eval_loss']:.4f} is above the median"
        return None

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            _, final = train(trial_config(space.base, settings, sweep_dir / name), on_eval=on_eval)
        except (ValueError, RuntimeError, OSError) as e:  # this trial's failure (NaN loss, say); the sweep goes on
            log.warning("trial %d failed: %s", trial.number, e)
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            return
    if final.get("interrupted"):
        log.warning("sweep stopped; run the same command again to continue (trial %d resumes from its checkpoint)",
                    trial.number)
        raise KeyboardInterrupt
    if (final.get("stopped") or "").startswith("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
    elif final.get("best") is None:
        trial.set_user_attr("error", "no held-out loss: set train.eval_every and hold out data "
                                     "(data.datasets[].eval_fraction)")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, final["best"])
