"""Export: handing a run to others (push to the Hugging Face hub). Imports config, the shared helpers and runs."""
