"""A pyfunc runs the code it was saved with: ``isc search --model`` loads only this project's descriptor
models unless ``--trust-model-code true`` (the hostile round: a cloudpickled pyfunc folder was loaded and
its code run, unlike the weights-only rule for checkpoints). Real pyfunc folders, the real CLI path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from entrypoints.cli import run_entrypoint


def _pickled_pyfunc(folder: Path, marker: Path) -> Path:
    """A cloudpickled pyfunc whose load_context leaves ``marker`` behind: proof that its code ran."""
    import mlflow

    class Model(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            Path(marker).write_text("code ran")

        def predict(self, context, model_input, params=None):
            return [[0.0]] * len(model_input)

    mlflow.pyfunc.save_model(str(folder), python_model=Model())
    Path(marker).unlink(missing_ok=True)  # saving ran load_context once (MLflow's own check)
    return folder


def _search(model, mini_data, tmp_path, capsys, *extra):
    rc = run_entrypoint("entrypoints.search", [
        "--model", str(model), "--references", str(mini_data.reference_dir), "--queries",
        str(mini_data.query_dir), "--index", str(tmp_path / "s" / "ref.index"), "--output", "", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return rc, err


def test_a_cloudpickled_pyfunc_is_refused_before_it_is_loaded(tracking, mini_data, tmp_path, capsys):
    marker = tmp_path / "marker.txt"
    model = _pickled_pyfunc(tmp_path / "pickled", marker)
    rc, err = _search(model, mini_data, tmp_path, capsys)
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("error:")][-1]
    assert "not an isc descriptor model" in line and "python_model.pkl" in line and "--trust-model-code" in line
    assert not marker.exists()  # nothing was unpickled, nothing ran
    # With the explicit flag the user takes responsibility, and the model's code does run.
    _search(model, mini_data, tmp_path, capsys, "--trust-model-code", "true")
    assert marker.read_text() == "code ran"


def test_search_help_says_a_pyfunc_runs_its_code(capsys):
    with pytest.raises(SystemExit):
        run_entrypoint("entrypoints.search", ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "runs the Python code it was saved with" in out and "--trust-model-code" in out


@pytest.mark.slow
def test_a_descriptor_model_folder_with_edited_code_is_refused(tracking, tmp_path):
    import mlflow
    import torch

    from isc.errors import ConfigError
    from isc.models import create_model, save_checkpoint
    from registry.image_search import check_model_code
    from registry.model_logging import log_descriptor_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pth.tar", create_model("test_efficientnet", input_size=32), epoch=0)
    info = log_descriptor_model(ckpt)
    own = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "own")))
    check_model_code(str(own))  # this checkout's own model: accepted
    check_model_code(info.model_uri)  # and through the store (only its MLmodel is read)
    for rel in ("descriptor_model.py", "code/isc/io.py"):
        edited = tmp_path / f"edited_{rel.replace('/', '_')}"
        shutil.copytree(own, edited)
        with open(edited / rel, "a") as fh:
            fh.write("\nimport os  # anything at all\n")
        with pytest.raises(ConfigError, match=rf"holds code that is not this isc's \({rel}\)"):
            check_model_code(str(edited))
        check_model_code(str(edited), trust=True)
