"""notebooks/quickstart.ipynb runs top to bottom (nbclient), so the tutorial cannot rot: every cell
without an error, both plots drawn, and the fine-tune answering in the trained style."""

from __future__ import annotations

import nbformat
from helpers import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("K2JAX_QUICKSTART_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # router load per expert, the loss curve
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "steps, loss" in text
    assert text.count("fine-tune: 'Arr, matey!") == 2, text
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
