"""Inference: load a run, generate in batches, chat, merge. Imports config, data, model."""
