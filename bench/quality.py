"""Quality benchmark: the demo recipe's champion vs perceptual-hash baselines, on any DISC21-layout folder.

Runs the whole main job (train stages -> extract -> NES -> evaluate -> promote) into a throwaway MLflow
store, then scores pHash and PDQ descriptors on the same ground truth, and prints one table (µAP and
recall@P90 under the official ISC21 protocol) in a single run. Each µAP comes with its 95 % query-
bootstrap interval, and each baseline row with the paired bootstrap of "champion minus baseline" (the same
resampled queries for both): its interval and the share of replicates the champion wins. With a few dozen
test queries, that is what tells a real lead from luck.

    python bench/quality.py                                   # builds the default mini dataset
    python bench/quality.py --data /data/my_disc21 --ground-truth /data/my_disc21/ground_truth_test.csv
    python bench/quality.py --profile full --data /data/disc21 # the seed's recipe (GPUs)
    python bench/quality.py --data data/mini --store . --experiment-name isc   # reuse `bash scripts/main.sh`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _score(name: str, desc, gt) -> dict:
    from isc.metrics import evaluate

    result = evaluate(desc, gt)
    m = result.metrics
    return {"method": name, "uAP": m.average_precision, "recall@P90": m.recall_p90, "_ranked": result.ranked}


def baseline_row(method: str, data, gt) -> dict:
    from isc.baselines import compute_descriptors
    from isc.io import Descriptors

    q = data.images("query")
    r = data.images("reference")
    t0 = time.perf_counter()
    desc = Descriptors(
        compute_descriptors([p for _, p in q], method), [i for i, _ in q],
        compute_descriptors([p for _, p in r], method), [i for i, _ in r],
    )
    return {**_score(method, desc, gt), "wall_s": time.perf_counter() - t0}


def champion_row(store: Path, model_name: str, gt, wall: float) -> dict:
    """Re-score the descriptors the champion was promoted on (its evaluation run's NES output)."""
    import mlflow
    from mlflow import MlflowClient

    from entrypoints.evaluate import load_descriptors
    from isc.metrics import ground_truth_fingerprint

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias(model_name, "champion")
    ev = client.get_run(mv.tags["isc.source_eval_run"])
    desc = load_descriptors(ev.data.params["descriptors"])
    row = _score(f"champion (models:/{model_name}@champion v{mv.version})", desc, gt)
    if ev.data.tags.get("isc.gt_fingerprint") == ground_truth_fingerprint(gt):  # promoted on this very GT
        assert abs(row["uAP"] - float(mv.tags["isc.average_precision"])) < 1e-9, "champion re-score differs"
    return {**row, "wall_s": wall}


def quality_table(rows: list[dict], gt, n_boot: int = 2000):
    """Rows -> DataFrame with the bootstrap columns; row 0 is the champion, the others are compared to it."""
    import pandas as pd

    from isc.metrics import bootstrap_average_precision

    boot = bootstrap_average_precision([r.pop("_ranked") for r in rows], gt, n_boot=n_boot)
    for k, r in enumerate(rows):
        lo, hi = boot.interval(k)
        r["uAP 95% CI"] = f"{lo:.3f}-{hi:.3f}"
        if k:
            dlo, dhi, p = boot.difference(0, k)
            r["champion - this (95% CI)"] = f"{dlo:+.3f} to {dhi:+.3f}"
            r["P(champion better)"] = p
    cols = ["method", "uAP", "uAP 95% CI", "recall@P90", "champion - this (95% CI)", "P(champion better)", "wall_s"]
    return pd.DataFrame(rows)[cols], boot


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="DISC21-layout folder (default: build the default mini dataset)")
    p.add_argument("--ground-truth", default="", help="scoring GT (default: ground_truth_test.csv, else ground_truth.csv)")
    p.add_argument("--profile", default="demo", help="training profile of the main job (demo | full)")
    p.add_argument("--work-dir", default="", help="where the throwaway store goes (default: a temp dir)")
    p.add_argument("--store", default="",
                   help="an ISC_HOME whose mlflow.db to use instead (e.g. the project root: a main job "
                        "already run there with the same data, profile, experiment and commit is reused)")
    p.add_argument("--experiment-name", default="quality", help="experiment of the main job")
    args = p.parse_args()

    from isc.data.disc21 import DISC21
    from isc.data.mini import make_mini

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="isc-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DISC21(args.data) if args.data else make_mini(work / "mini", seed=0, size="default", overwrite=True)
    gt = Path(args.ground_truth) if args.ground_truth else data.ground_truth("test")
    if not gt.exists():
        gt = data.ground_truth()

    store = Path(args.store).resolve() if args.store else work
    env = dict(os.environ, ISC_HOME=str(store), MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "entrypoints.main", "--data", str(data.root), "--profile", args.profile,
                    "--n-trials", "0", "--experiment-name", args.experiment_name], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    from isc.io import read_ground_truth

    gt_obj = read_ground_truth(gt)
    rows = [champion_row(store, "isc-descriptor", gt_obj, wall)]
    rows += [baseline_row(m, data, gt_obj) for m in ("phash", "pdq")]
    table, boot = quality_table(rows, gt_obj)
    print(f"\nscored on {gt} ({len(boot.queries)} queries, official ISC21 protocol; "
          f"{boot.samples.shape[1]} paired query-bootstrap replicates)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep=""))
    best = max(r["uAP"] for r in rows[1:])
    print(f"champion / best hash baseline µAP ratio: {rows[0]['uAP'] / best if best > 0 else float('inf'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
