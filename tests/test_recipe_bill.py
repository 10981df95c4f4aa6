"""bench/recipe_bill.sh at its CPU smoke scale: every part runs end to end and prints the bill.

The GPU figures themselves need a device (docs/training.md says they are pending); this proves the script
executes -- the project's dataset, views, loss, DDP wrapping, extraction and kNN -- and that its
per-GPU layout and projection follow the seed's stages."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from bench.recipe_bill import REAL_STAGES, per_gpu, steps_per_epoch
from tests.servers import PROJECT_ROOT

STAGE = {s.name: s for s in REAL_STAGES}


def test_per_gpu_batches_and_steps_follow_the_seeds_stages():
    assert per_gpu(STAGE["1a"], 4) == (32, 0)  # v83: global 128 over 4 GPUs
    assert per_gpu(STAGE["2"], 8) == (16, 0)  # v86: global 128 over 8 GPUs
    assert per_gpu(STAGE["3"], 8) == (8, 2)  # v98: global 64, two reference negatives per item
    assert per_gpu(STAGE["4"], 8) == (1, 14)  # v107: one pair per GPU plus 2G - 2 negatives
    assert per_gpu(STAGE["4"], 1) == (1, 0)
    assert steps_per_epoch(STAGE["1a"], 4) == 1_000_000 // 128 == 7812
    assert steps_per_epoch(STAGE["4"], 8) == math.ceil(4991 / 8) == 624
    assert [s.epochs for s in REAL_STAGES] == [5, 5, 7, 3, 10]
    assert [s.px for s in REAL_STAGES] == [256, 256, 384, 512, 512]


@pytest.mark.slow
def test_smoke_run_measures_every_part_and_prints_the_table(tmp_path):
    out = tmp_path / "bill.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SKIP_WHEELS": "1"}
    proc = subprocess.run(
        ["bash", str(PROJECT_ROOT / "bench" / "recipe_bill.sh"), "--smoke", "--stages", "1a,1b,3,4", "--gpus", "1,2",
         "--json", str(out), "--forbid-imports", "mlflow,optuna"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    rows = re.findall(r"^\| (1a|1b|3|4) \| \d+ \| (\d) \| (\d+) x (\d+) = (\d+) \|", text, re.M)
    assert {(r[0], r[1]) for r in rows} == {(s, g) for s in ("1a", "1b", "3", "4") for g in ("1", "2")}, text
    # stage 4 on 2 GPUs: 1 pair + 2 negatives per GPU; stage 3: items x (2 views + 2 negatives)
    assert ("4", "2", "1", "4", "4") in rows and ("3", "1", "4", "4", "16") in rows, rows
    assert re.search(r"^\| 2 \| \d+\.\d \| \d+\.\d\d \| \d+\.\d \| \d+\.\d \|$", text, re.M), text
    bill = json.loads(out.read_text())
    for cell in bill["cells"]:
        assert not cell["error"], cell
        assert all(cell[k] > 0 for k in ("loader", "compute", "step", "seconds_per_step")), cell
    h1, h2 = bill["hours"]["1"], bill["hours"]["2"]
    assert h1["1a"] == h1["1b"] > 0  # 1b runs 1a's step for the same 5 epochs
    assert h1["train"] == sum(h1[s] for s in ("1a", "1b", "3", "4"))
    assert h2["train"] > 0
    assert bill["extraction"]["images_per_s"] > 0 and bill["knn"]["torch_seconds"] > 0
    assert bill["knn"]["faiss_seconds_projected"] > 0
