"""notebooks/fig1.ipynb runs top to bottom on the committed smoke results and draws both figures."""

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "fig1.ipynb"


def test_fig1_notebook_redraws_the_panels_and_lambda_from_the_smoke_results(monkeypatch):
    results = REPO / "results" / "smoke"
    monkeypatch.setenv("FIG1_RESULTS", str(results))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    outputs = {cell.source: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
    assert all(o.output_type != "error" for cell in outputs.values() for o in cell)
    for source in ("figure1(runs, membership)", "lambda_figure(runs)"):
        [shown] = [o for o in outputs[source] if o.output_type == "execute_result"]
        assert shown.data["image/png"], source  # drawn inline
    listing = "".join(o.text for o in outputs[next(s for s in outputs if "read_runs_csv" in s)])
    assert listing.count("finished") == 12 and "classnet-agc-synthetic-b4-lr0.08-s0-e3" in listing


def test_the_committed_notebook_holds_no_outputs():
    # outputs belong to whoever runs it; committed ones would go stale against results/
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
