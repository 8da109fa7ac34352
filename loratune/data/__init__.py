"""Data: read records (sources), turn them into tokenized examples (examples, cache, presets, demo), pack and batch
them (packing, batches); the `prepare` and `doctor` commands. Imports config and, for doctor's tokenizer, model."""
