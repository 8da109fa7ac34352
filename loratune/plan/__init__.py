"""Planning runs before and across spending on them: what a run will cost (estimate), sweeps over a grid or an Optuna
search space (sweep), what a trial may vary (space), the sweep's table and sweep.html (sweep_report). Imports config
and training (each trial is an ordinary `train()` run; a probe is a short one)."""
