"""The Colab notebooks in colab/: committed without outputs, set up Colab in their first code
cell, and run from top to bottom (small size, offline) in a kernel of this environment."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {path.name: path for path in sorted((ROOT / "colab").glob("*.ipynb"))}
REPO_URL_LINE = 'REPO_URL = "https://github.com/childtuning-jax/childtuning-jax"'


def read(name):
  return nbformat.read(NOTEBOOKS[name], as_version=4)


def code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_both_notebooks_are_there_and_valid():
  assert set(NOTEBOOKS) == {"quickstart.ipynb", "glue_finetuning.ipynb"}
  for name in NOTEBOOKS:
    nbformat.validate(read(name))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "glue_finetuning.ipynb"])
def test_committed_notebook_has_no_outputs(name):
  for index, cell in enumerate(code_cells(read(name))):
    assert cell.outputs == [], f"{name}, code cell {index} holds outputs: strip them"
    assert cell.execution_count is None, f"{name}, code cell {index} has an execution count"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "glue_finetuning.ipynb"])
def test_first_cells_are_the_title_and_the_colab_install(name):
  notebook = read(name)
  assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
  install = code_cells(notebook)[0].source
  assert REPO_URL_LINE in install
  assert '"google.colab" in sys.modules' in install
  assert "pip" in install and "git" in install and "CHILDTUNING_REPO_ROOT" in install
  assert 'os.environ.get("CHILDTUNING_NOTEBOOK_SIZE", "full") == "small"' in "".join(
      cell.source for cell in code_cells(notebook))


def execute(name, tmp_path, monkeypatch, request):
  """Runs the notebook in a fresh kernel of this interpreter with the working directory
  `tmp_path / "work"`; returns the executed notebook and that directory. Any cell error
  fails the test."""
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  # A kernelspec "python3" for this interpreter, first on the Jupyter path, so that no other
  # installed "python3" kernel (another Python) can be picked.
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  for key, value in {"CHILDTUNING_NOTEBOOK_SIZE": "small", "CHILDTUNING_REPO_ROOT": str(ROOT),
                     "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "MPLBACKEND": "Agg"}.items():
    monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
  # The trainer's compilations dominate the GLUE notebook's time (the CT-F step alone takes
  # most of a minute on 2 busy cores): keep them across test sessions in pytest's cache
  # (a few MB), so that only the first session after a change compiles them.
  cache = getattr(request.config, "cache", None)
  if cache is not None:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache.mkdir("notebooks-jax-cache")))
  work = tmp_path / "work"
  work.mkdir()

  notebook = read(name)
  # First, report the kernel's interpreter (checked below).
  notebook.cells.insert(0, nbformat.v4.new_code_cell(
      "import sys\nprint('KERNEL', sys.prefix, sys.executable)"))
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                   startup_timeout=120,
                                   resources={"metadata": {"path": str(work)}})
  client.execute()
  kernel = text_of(notebook.cells[0]).split()
  assert kernel[0] == "KERNEL" and Path(kernel[1]) == Path(sys.prefix), kernel
  assert Path(kernel[2]) == Path(sys.executable), kernel
  return notebook, work


def text_of(cell):
  return "".join(output.get("text", "") for output in cell.get("outputs", [])
                 if output.output_type == "stream")


def test_quickstart_runs(tmp_path, monkeypatch, request):
  pytest.importorskip("matplotlib")
  notebook, _ = execute("quickstart.ipynb", tmp_path, monkeypatch, request)
  text = "".join(text_of(cell) for cell in notebook.cells)
  assert f"childtuning-jax: {ROOT}" in text
  for mode in ("vanilla", "CT-F", "CT-D"):
    assert f"{mode}: test accuracy" in text
  assert "CT-D frozen weights that changed: 0" in text


def test_glue_finetuning_runs(tmp_path, monkeypatch, request):
  pytest.importorskip("matplotlib")
  pytest.importorskip("transformers")
  from childtuning_jax.models import embedded_model_path

  try:
    embedded_model_path()
  except Exception as error:  # the trainer's offline default needs the embedded wheels
    pytest.skip(f"embedded model not installed: {error}")
  notebook, work = execute("glue_finetuning.ipynb", tmp_path, monkeypatch, request)
  text = "".join(text_of(cell) for cell in notebook.cells)
  assert "The embedded pretrained MiniLM-L6 on the embedded Rotten Tomatoes reviews, because " \
         "HF_HUB_OFFLINE is set." in text
  runs = work / "runs" / "notebook"
  for folder, mode in (("vanilla", "vanilla"), ("ct_f", "ChildTuning-F"),
                       ("ct_d", "ChildTuning-D")):
    results = json.loads((runs / folder / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 64
    assert json.loads((runs / folder / "run_args.json").read_text())["mode"] == mode
    assert f"{results['eval_accuracy']:>13.4f}" in text  # in the comparison table
  assert (runs / "ct_d" / "mask_keep_fractions.json").is_file()
  assert (runs / "comparison.png").stat().st_size > 0
  assert (runs / "ct_d_keep_fractions.png").stat().st_size > 0
