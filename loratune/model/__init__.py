"""The model: resolve `model.name` (hub, local, GGUF, embedded), load it with its tokenizer, add the adapter (load);
random-init shapes for tests and benchmarks (shapes); attention for packed rows (attention); the loss (loss).
Imports config and data.examples."""
