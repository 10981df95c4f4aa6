"""bench/gpu_check.sh in its CPU mode: the same code paths as on the GPU box at toy sizes, so it never rots.

The GPU box has no MLflow, AugLy, Optuna or scikit-learn: the run forbids importing them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.servers import PROJECT_ROOT

SECTIONS = ["train", "extract", "faiss", "ddp", "amp_extract", "decode", "knn"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SKIP_WHEELS": "1"}
    return subprocess.run(
        ["bash", str(PROJECT_ROOT / "bench" / "gpu_check.sh"), "--cpu",
         "--forbid-imports", "mlflow,augly,optuna,sklearn", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_gpu_check_cpu_mode_runs_every_section_and_prints_its_figures():
    proc = _run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    assert [ln.split(":")[0][len("CHECK ") :] for ln in lines] == SECTIONS, proc.stdout
    assert all(ln.endswith("... OK") for ln in lines), proc.stdout
    text = "\n".join(lines)
    assert re.search(r"CHECK train: \d+ images/s", text)
    assert re.search(r"CHECK extract: ratio \d+\.\d\d", text)
    assert re.search(r"CHECK faiss: GPU/CPU speed-up \d+x per query .* ids 100/100", text)
    assert "gloo world size 1" in text
    assert re.search(r"CHECK amp_extract: .* min cosine 0\.9\d+", text)
    assert re.search(r"CHECK decode: JPEG decode \+ resize on cpu .* self-match 1\.00", text)
    assert re.search(r"CHECK knn: chooser picks faiss-cpu; .*faiss-cpu \d+ ms ids 2000/2000, torch-cpu \d+ ms ids 2000/2000", text)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_check: 7/7 OK")


def test_a_failing_section_prints_fail_and_exits_non_zero():
    proc = _run("--only", "faiss", "--forbid-imports", "mlflow,faiss")
    assert proc.returncode == 1
    assert re.search(r"^CHECK faiss: faiss not importable .* \.\.\. FAIL$", proc.stdout, re.M), proc.stdout
