"""``scripts/main.sh`` hands the experiment name to Python as argv: a crafted name is a name, not code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import PROJECT_ROOT


def _experiment_line() -> str:
    """The line of main.sh that creates the experiment (run alone: the rest would start the whole job)."""
    lines = [
        ln
        for ln in (PROJECT_ROOT / "scripts" / "main.sh").read_text().splitlines()
        if ln.startswith("python -c") and "get_or_create_experiment" in ln
    ]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("kind", ["injection", "apostrophe"])
def test_experiment_name_from_the_environment_is_never_executed(tmp_path, kind):
    from mlflow import MlflowClient

    marker = tmp_path / "pwned"
    name = f"x'); open({str(marker)!r}, 'w').close(); ('" if kind == "injection" else "alice's exp"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_EXPERIMENT_NAME=name,
        ISC_HOME=str(tmp_path),
        PYTHONPATH=str(PROJECT_ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
    )
    proc = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{_experiment_line()}"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists(), "the experiment name was executed as Python code"
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    assert exp is not None and exp.name == name
