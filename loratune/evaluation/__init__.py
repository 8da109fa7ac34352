"""Evaluation: metrics with higher_is_better, base vs runs side by side (compare), the HTML report (report).
Imports config, data, model, inference."""
