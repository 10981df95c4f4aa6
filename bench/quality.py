"""Quality benchmark: the demo recipe's champion vs perceptual-hash baselines, on any DISC21-layout folder.

Runs the whole main job (train stages -> extract -> NES -> evaluate -> promote) into a throwaway MLflow
store, then scores pHash and PDQ descriptors on the same ground truth, and prints one table (µAP and
recall@P90 under the official ISC21 protocol) in a single run:

    python bench/quality.py                                   # builds the default mini dataset
    python bench/quality.py --data /data/my_disc21 --ground-truth /data/my_disc21/ground_truth_test.csv
    python bench/quality.py --profile full --data /data/disc21 # the seed's recipe (GPUs)
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


def baseline_row(method: str, data, gt_path: Path) -> dict:
    from isc.baselines import compute_descriptors
    from isc.io import Descriptors, read_ground_truth
    from isc.metrics import evaluate

    q = data.images("query")
    r = data.images("reference")
    t0 = time.perf_counter()
    desc = Descriptors(
        compute_descriptors([p for _, p in q], method), [i for i, _ in q],
        compute_descriptors([p for _, p in r], method), [i for i, _ in r],
    )
    m = evaluate(desc, read_ground_truth(gt_path)).to_dict()
    return {"method": method, "uAP": m["average_precision"], "recall@P90": m["recall_p90"],
            "wall_s": time.perf_counter() - t0}


def champion_row(store: Path, model_name: str, wall: float) -> dict:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mv = MlflowClient().get_model_version_by_alias(model_name, "champion")
    return {"method": f"champion (models:/{model_name}@champion v{mv.version})",
            "uAP": float(mv.tags["isc.average_precision"]), "recall@P90": float(mv.tags["isc.recall_p90"]),
            "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="DISC21-layout folder (default: build the default mini dataset)")
    p.add_argument("--ground-truth", default="", help="scoring GT (default: ground_truth_test.csv, else ground_truth.csv)")
    p.add_argument("--profile", default="demo", help="training profile of the main job (demo | full)")
    p.add_argument("--work-dir", default="", help="where the throwaway store goes (default: a temp dir)")
    args = p.parse_args()

    import pandas as pd

    from isc.data.disc21 import DISC21
    from isc.data.mini import make_mini

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="isc-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DISC21(args.data) if args.data else make_mini(work / "mini", seed=0, size="default", overwrite=True)
    gt = Path(args.ground_truth) if args.ground_truth else data.ground_truth("test")
    if not gt.exists():
        gt = data.ground_truth()

    env = dict(os.environ, ISC_HOME=str(work), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "entrypoints.main", "--data", str(data.root), "--profile", args.profile,
                    "--n-trials", "0", "--experiment-name", "quality"], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    rows = [champion_row(work, "isc-descriptor", wall)]
    rows += [baseline_row(m, data, gt) for m in ("phash", "pdq")]
    table = pd.DataFrame(rows)
    print(f"\nscored on {gt} (official ISC21 protocol)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    best = max(r["uAP"] for r in rows[1:])
    print(f"champion / best hash baseline µAP ratio: {rows[0]['uAP'] / best if best > 0 else float('inf'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
