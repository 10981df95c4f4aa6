"""conda.yaml's pip block mirrors pyproject.toml, so `mlflow run --env-manager conda` and `pip install -e .`
build the same environment (issue 21: the conda file had drifted, e.g. scipy was missing)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.servers import PROJECT_ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_conda_pip_block_pins_every_pyproject_dependency_alike():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pinned = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-")}
    for req in project["dependencies"]:
        req = req.split("#")[0].replace(" ", "")
        assert pinned.get(_name(req)) == req, f"conda.yaml pip block: {pinned.get(_name(req))!r} != pyproject {req!r}"
    assert "-e ." in pip
    # faiss: the conda build on GPU machines, never a second copy from pip; pyproject offers both wheels
    conda_faiss = [d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("faiss")]
    assert conda_faiss and not any(_name(r).startswith("faiss") for r in pip)
    extras = project["optional-dependencies"]
    assert extras["cpu"][0].split("==")[1] == extras["gpu"][0].split("==")[1]  # same faiss either way
