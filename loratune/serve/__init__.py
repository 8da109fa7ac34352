"""Serving: runs behind an OpenAI-compatible HTTP API (`loratune serve`), many adapters on one base model."""
