"""Planning runs: sweeps over a grid or an Optuna search space (sweep), what a trial may vary (space), the sweep's
table and sweep.html (sweep_report). Imports config and training (each trial is an ordinary `train()` run)."""
