"""examples/quickstart.ipynb runs from top to bottom as a user would run it (a fresh kernel, its own folder)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")
               for cell in nb.cells if cell.cell_type == "code"]
    assert "runs/quickstart 12" in outputs[0]
    assert len(outputs[1].strip().splitlines()) == 2
    assert "PeftModel" in outputs[2]
    assert (tmp_path / "runs" / "quickstart" / "adapter_model.safetensors").is_file()
