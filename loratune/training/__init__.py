"""Training: the recipe (recipe.train), the CUDA-graphed step (graphs), checkpoints and exact resume (checkpoint),
several processes (distributed), metrics files and trackers (tracking), evaluation during training (periodic_eval).
Imports config, data, model, and evaluation/inference for periodic generation metrics."""
