"""Quality benchmark: the demo recipe's champion vs its untrained start and perceptual hashes, on any
DISC21-layout folder.

Runs the whole main job (train stages -> extract -> NES -> evaluate -> promote) into a throwaway MLflow
store, then scores the "pretrained, no fine-tuning" model (stage 0), pHash and PDQ on the same ground truth,
and prints one table (µAP and recall@P90 under the official ISC21 protocol) in a single run. Each µAP comes with its 95 % query-
bootstrap interval, and each baseline row with the paired bootstrap of "champion minus baseline" (the same
resampled queries for both): its interval and the share of replicates the champion wins. With a few dozen
test queries, that is what tells a real lead from luck.

    python bench/quality.py                                   # builds the default mini dataset
    python bench/quality.py --data /data/my_disc21 --ground-truth /data/my_disc21/ground_truth_test.csv
    python bench/quality.py --profile full --data /data/disc21 # the seed's recipe (GPUs)
    python bench/quality.py --data data/mini --store . --experiment-name isc   # reuse `bash scripts/main.sh`
    # other photos: the champion (and its stage 0) of the main job above, on a folder it never saw a pixel of
    python bench/quality.py --data data/mini --store . --experiment-name isc --transfer /data/other_photos

``--transfer DIR`` extracts the champion and the stage-0 model on DIR (queries, references, training
images), applies negative embedding subtraction with DIR's own training images as the negatives (as on
DISC21), and scores DIR's ``ground_truth.csv`` (every query: none of DIR was seen in training).
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

    from isc.contract import CHAMPION, Tag
    from isc.evaluation import load_descriptors
    from isc.metrics import ground_truth_fingerprint

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias(model_name, CHAMPION)
    ev = client.get_run(mv.tags[Tag.SOURCE_EVAL_RUN])
    desc = load_descriptors(ev.data.params["descriptors"])
    row = _score(f"champion (models:/{model_name}@champion v{mv.version})", desc, gt)
    if ev.data.tags.get(Tag.GT_FINGERPRINT) == ground_truth_fingerprint(gt):  # promoted on this very GT
        assert abs(row["uAP"] - float(mv.tags[Tag.AVERAGE_PRECISION])) < 1e-9, "champion re-score differs"
    return {**row, "wall_s": wall}


def stage0_row(store: Path, experiment: str, gt) -> dict | None:
    """Re-score the NES descriptors of the newest main job's stage 0 (pretrained, no fine-tuning)."""
    import mlflow
    from mlflow import MlflowClient

    from isc.contract import Tag
    from isc.evaluation import load_descriptors

    ev = _main_tags(store, experiment).get(f"{Tag.STEP_RUN_PREFIX}evaluate_stage0")
    if ev is None:
        return None
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    desc = load_descriptors(MlflowClient().get_run(ev).data.params["descriptors"])
    return {**_score("stage 0 (pretrained, no fine-tuning)", desc, gt), "wall_s": float("nan")}


def _main_tags(store: Path, experiment: str) -> dict[str, str]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`isc.step` = 'main' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    return dict(runs[0].data.tags) if runs else {}


def transfer_rows(store: Path, experiment: str, folder, model_name: str = "isc-descriptor") -> list[dict]:
    """Champion and stage-0 model of the store's main job, extracted and post-processed on ``folder``."""
    import mlflow

    from isc.extract import extract_descriptors
    from isc.io import Descriptors, read_descriptors, read_train_descriptors
    from isc.models import load_model
    from isc.postprocess import postprocess_descriptors

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    from isc.contract import CHAMPION, Tag

    refs = {"champion": f"models:/{model_name}@{CHAMPION}"}
    stage0 = _main_tags(store, experiment).get(f"{Tag.STEP_RUN_PREFIX}train_stage0")
    if stage0:
        refs["stage 0 (pretrained, no fine-tuning)"] = stage0
    rows = []
    for name, ref in refs.items():
        t0 = time.perf_counter()
        out = Path(tempfile.mkdtemp(prefix="isc-transfer-"))
        extract_descriptors(load_model(ref), folder, "qrt", out, batch_size=32, workers=2)
        raw = read_descriptors(out / "descriptors.h5")
        train, _ = read_train_descriptors(out / "train_descriptors.h5")
        nes = postprocess_descriptors(raw.query, raw.reference, train)
        desc = Descriptors(nes.query, raw.query_ids, nes.reference, raw.reference_ids)
        rows.append({"name": f"{name} ({ref})", "desc": desc, "wall_s": time.perf_counter() - t0})
    return rows


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
    p.add_argument("--skip-main", action="store_true",
                   help="with --store: score the champion and stage 0 already there, without running the main job")
    p.add_argument("--transfer", default="",
                   help="also score the champion and stage 0 on this other DISC21-layout folder (its ground_truth.csv)")
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
    if not (args.skip_main and args.store):
        subprocess.run([sys.executable, "-m", "entrypoints.main", "--data", str(data.root), "--profile",
                        args.profile, "--n-trials", "0", "--experiment-name", args.experiment_name], cwd=ROOT,
                       env=env, check=True)
    wall = time.perf_counter() - t0
    from isc.io import read_ground_truth

    gt_obj = read_ground_truth(gt)
    rows = [champion_row(store, "isc-descriptor", gt_obj, wall)]
    start = stage0_row(store, args.experiment_name, gt_obj)
    rows += [start] if start else []
    rows += [baseline_row(m, data, gt_obj) for m in ("phash", "pdq")]
    _print(rows, gt_obj, gt)
    if args.transfer:
        other = DISC21(args.transfer)
        other_gt_path = other.ground_truth()
        other_gt = read_ground_truth(other_gt_path)
        rows = [{**_score(r["name"], r["desc"], other_gt), "wall_s": r["wall_s"]}
                for r in transfer_rows(store, args.experiment_name, other)]
        rows += [baseline_row(m, other, other_gt) for m in ("phash", "pdq")]
        _print(rows, other_gt, other_gt_path)
    return 0


def _print(rows: list[dict], gt_obj, gt_path) -> None:
    table, boot = quality_table(rows, gt_obj)
    print(f"\nscored on {gt_path} ({len(boot.queries)} queries, official ISC21 protocol; "
          f"{boot.samples.shape[1]} paired query-bootstrap replicates)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep=""))
    best = max(r["uAP"] for r in rows[1:])
    print(f"champion / best other row µAP ratio: {rows[0]['uAP'] / best if best > 0 else float('inf'):.2f}")


if __name__ == "__main__":
    sys.exit(main())
