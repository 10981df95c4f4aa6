"""Quality benchmark: the demo recipe's champion vs its untrained start and perceptual hashes, on any
DISC21-layout folder.

Runs the whole main job (train stages -> extract -> NES -> evaluate -> promote) into a throwaway MLflow
store, then pulls the champion from the registry exactly as a user does (``models:/isc-descriptor@champion``
with the extraction settings registered on the version: input size and TTA chosen on val, nothing passed by
hand), extracts it on the data, applies NES, and scores it next to the "pretrained, no fine-tuning" model
(stage 0) under the same settings, pHash and PDQ on the same ground truth, and prints one table (µAP and recall@P90 under the official ISC21 protocol) in a single run. Each µAP comes with its 95 % query-
bootstrap interval, and each baseline row with the paired bootstrap of "champion minus baseline" (the same
resampled queries for both): its interval and the share of replicates the champion wins. With a few dozen
test queries, that is what tells a real lead from luck.

    python bench/quality.py                                   # builds the default mini dataset
    python bench/quality.py --data /data/my_disc21 --ground-truth /data/my_disc21/ground_truth_test.csv
    python bench/quality.py --profile full --data /data/disc21 # the seed's recipe (GPUs)
    python bench/quality.py --data data/mini --store . --experiment-name isc   # reuse `bash scripts/main.sh`
    # other photos: the champion (and its stage 0) of the main job above, on a folder it never saw a pixel of
    python bench/quality.py --data data/mini --store . --experiment-name isc --transfer /data/other_photos

``--transfer-ground-truth`` picks DIR's scoring files (e.g. ``ground_truth_val.csv,ground_truth_test.csv``: a make-mini
folder's photo-size splits). ``--transfer DIR`` does the same (the champion as pulled, stage 0 at its settings) on DIR (queries, references, training
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


def _main_tags(store: Path, experiment: str) -> dict[str, str]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`isc.step` = 'main' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    return dict(runs[0].data.tags) if runs else {}


def pulled_rows(store: Path, experiment: str, folder, model_name: str = "isc-descriptor") -> list[dict]:
    """The champion as a user pulls it (``models:/<name>@champion`` with the extraction settings registered on the
    version, nothing passed by hand: what ``isc extract --model models:/...`` does) and the store's stage-0
    model (pretrained, no fine-tuning) under the same settings, extracted on ``folder`` with negative embedding
    subtraction against ``folder``'s own training images (as on DISC21). Rows: name, descriptors, wall time."""
    import mlflow

    from isc.contract import CHAMPION, Tag, model_uri
    from isc.models import load_model
    from isc.settings import resolve, served_settings

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    champion = load_model(model_uri(model_name, CHAMPION))
    settings, source = resolve(champion, served_settings(champion.checkpoint_path), None, None)
    models = {f"champion as pulled ({model_uri(model_name, CHAMPION)}, {settings.label}: {source})": champion}
    stage0 = _main_tags(store, experiment).get(f"{Tag.STEP_RUN_PREFIX}train_stage0")
    if stage0:
        models[f"stage 0, pretrained, no fine-tuning ({settings.label}, the champion's)"] = load_model(stage0)
    rows = []
    for name, model in models.items():
        t0 = time.perf_counter()
        desc = nes_descriptors(model, folder, Path(tempfile.mkdtemp(prefix="isc-pulled-")), settings.input_size,
                               settings.tta)
        rows.append({"name": name, "desc": desc, "wall_s": time.perf_counter() - t0})
    return rows


def nes_descriptors(model, folder, out: Path, input_size: int | None, tta: bool):
    """``model``'s query and reference descriptors of ``folder`` after negative embedding subtraction with the
    folder's own training images (as on DISC21), extracted into ``out``."""
    from isc.contract import DESCRIPTORS_FILE, TRAIN_DESCRIPTORS_FILE
    from isc.extract.streamed import extract_descriptors
    from isc.io import Descriptors, read_descriptors, read_train_descriptors
    from isc.postprocess import postprocess_descriptors

    extract_descriptors(model, folder, "qrt", out, input_size=input_size, tta=tta, batch_size=32, workers=2)
    raw = read_descriptors(out / DESCRIPTORS_FILE)
    train, _ = read_train_descriptors(out / TRAIN_DESCRIPTORS_FILE)
    nes = postprocess_descriptors(raw.query, raw.reference, train)
    return Descriptors(nes.query, raw.query_ids, nes.reference, raw.reference_ids)


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
    p.add_argument("--transfer-ground-truth", default="",
                   help="the --transfer folder's scoring GT (default its ground_truth.csv; several: comma-separated, "
                        "pooled, e.g. ground_truth_val.csv,ground_truth_test.csv for a make-mini folder's photo-size splits)")
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

    print(f"main job: {wall:.0f} s")
    scored = [(data, gt)]
    if args.transfer:
        other = DISC21(args.transfer)
        names = [n for n in args.transfer_ground_truth.split(",") if n]
        scored.append((other, [other.root / n for n in names] if names else other.ground_truth()))
    for folder, gt_path in scored:
        gt_obj = pooled_ground_truth(gt_path) if isinstance(gt_path, list) else read_ground_truth(gt_path)
        rows = [{**_score(r["name"], r["desc"], gt_obj), "wall_s": r["wall_s"]}
                for r in pulled_rows(store, args.experiment_name, folder)]
        rows += [baseline_row(m, folder, gt_obj) for m in ("phash", "pdq")]
        _print(rows, gt_obj, gt_path)
    return 0


def pooled_ground_truth(paths: list[Path]):
    """Several ground-truth files of one folder (disjoint queries) read as one."""
    from isc.io import GroundTruth, read_ground_truth

    parts = [read_ground_truth(p) for p in paths]
    return GroundTruth([q for g in parts for q in g.queries], set().union(*(g.positives for g in parts)))


def _print(rows: list[dict], gt_obj, gt_path) -> None:
    table, boot = quality_table(rows, gt_obj)
    print(f"\nscored on {gt_path} ({len(boot.queries)} queries, official ISC21 protocol; "
          f"{boot.samples.shape[1]} paired query-bootstrap replicates)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep=""))
    best = max(r["uAP"] for r in rows[1:])
    print(f"champion / best other row µAP ratio: {rows[0]['uAP'] / best if best > 0 else float('inf'):.2f}")


if __name__ == "__main__":
    sys.exit(main())
