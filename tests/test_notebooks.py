"""The notebooks in ``notebooks/`` run end to end at smoke size, and are committed without outputs.

Each notebook is executed by a fresh IPython kernel (nbclient) with ``GRADJAX_SMOKE=1`` — its "parameters" cell
then picks the small sizes — on one CPU device (the 8 fake devices of ``conftest.py`` are not passed on), in a
temporary working directory. A cell that raises fails the test with the cell's traceback; so does a notebook whose
outputs were committed (strip them with ``python tests/test_notebooks.py --strip``, or ``nbstripout``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600


def kernel_env() -> dict:
    """The environment of the notebook kernel: smoke sizes, CPU, one device, no progress bars."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(GRADJAX_SMOKE="1", JAX_PLATFORMS="cpu", TQDM_DISABLE="1", PYTHONWARNINGS="ignore::DeprecationWarning",
               # smoke runs check that every cell runs, not speed: XLA compiles ~2x faster without optimizations
               JAX_DISABLE_MOST_OPTIMIZATIONS="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    return env


def execute_notebook(nb, workdir: str, *, timeout: int = CELL_TIMEOUT_S):
    """Execute ``nb`` (an ``nbformat`` notebook, modified in place) in ``workdir`` with this interpreter's
    IPython kernel; raises ``nbclient.exceptions.CellExecutionError`` at the first failing cell."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # the native kernel of *this* interpreter, whatever kernelspecs the user has installed
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                            resources={"metadata": {"path": workdir}})
    client.execute(env=kernel_env())
    return nb


def _outputs_text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


def test_three_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_train_gradient_objective.ipynb", "03_hessian_traces.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p)[:2] for p in NOTEBOOKS])
def test_notebook_outputs_stripped(path):
    with open(path) as f:
        nb = json.load(f)
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{os.path.basename(path)}: code cells {dirty} carry outputs or execution counts; strip them "
                       "(python tests/test_notebooks.py --strip, or nbstripout) before committing.")
    assert "widgets" not in nb.get("metadata", {}), "notebook metadata holds widget state; strip it."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p)[:2] for p in NOTEBOOKS])
def test_notebook_opens_with_install_and_parameters_cells(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the [test] extra")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "pip" in code[0].source and "importlib.util.find_spec(\"gradjax\")" in code[0].source, \
        "the first code cell installs gradjax (repository URL or local checkout) when it is missing"
    assert not re.search(r"huggingface|hf_hub|wget |curl |tfds\.load|download", "\n".join(c.source for c in code)), \
        "notebooks must not download models or data at run time"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "GRADJAX_SMOKE" in params[0].source, "one 'parameters' cell reading GRADJAX_SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p)[:2] for p in NOTEBOOKS])
def test_notebook_executes_at_smoke_size(path, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the [test] extra")
    pytest.importorskip("nbclient", reason="nbclient is in the [test] extra")
    pytest.importorskip("ipykernel", reason="ipykernel is in the [test] extra")
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    execute_notebook(nb, str(tmp_path))
    seconds = time.perf_counter() - t0
    print(f"{os.path.basename(path)}: executed in {seconds:.1f} s")
    text = _outputs_text(nb)
    if "01_" in path:
        assert "FullGrad relative residual" in text and "test accuracy" in text
    if "02_" in path:
        assert re.search(r"finished at step (\d+) of \1", text), text[-2000:]
    if "03_" in path:
        assert "Hutch++" in text
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 1, "every notebook shows at least one figure inline"


def test_broken_cell_fails_the_run(tmp_path):
    """A notebook with a failing cell makes the execution (and so CI) fail, naming the error."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the [test] extra")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the [test] extra")
    pytest.importorskip("ipykernel", reason="ipykernel is in the [test] extra")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nx = 1"),
                                         nbformat.v4.new_code_cell("from gradjax import trace\ntrace.no_such_estimator()"),
                                         nbformat.v4.new_code_cell("print('not reached')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="AttributeError.*no_such_estimator"):
        execute_notebook(nb, str(tmp_path), timeout=120)
    assert not nb.cells[2].get("outputs"), "execution stops at the failing cell"


def strip_outputs(path: str) -> bool:
    """Remove outputs, execution counts and widget state from a notebook file; True if it changed."""
    with open(path) as f:
        nb = json.load(f)
    before = json.dumps(nb, sort_keys=True)
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    if json.dumps(nb, sort_keys=True) == before:
        return False
    with open(path, "w") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--strip"]:
        for p in NOTEBOOKS:
            print(("stripped " if strip_outputs(p) else "clean    ") + os.path.relpath(p, ROOT))
    else:
        print("usage: python tests/test_notebooks.py --strip")
