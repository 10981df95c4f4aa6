"""Does val pick what is best on test? The main job's stage models, each at its training size and at other
input sizes, scored on the val and test splits of several make-mini seeds (other photos per split each time).

For every seed: build the mini dataset (bundled photos, or ``--source DIR``), extract every (stage, size)
candidate on it, apply negative embedding subtraction with the dataset's own training images, score val and
test (official ISC21 µAP). Prints, per seed, the candidate val picks, the one best on test, what the pick
loses on test ("regret"), and the paired-bootstrap interval of "val's pick minus val's runner-up" on val
(how far apart two candidates must be for this val to tell them apart); then how often val picked the
test-best candidate.

    python bench/val_power.py --store . --experiment-name isc                      # after bash scripts/main.sh
    python bench/val_power.py --store . --experiment-name isc --source ~/photos --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality import _main_tags, nes_descriptors  # noqa: E402

STAGES = ("stage0", "stage1", "stage1b", "stage2", "stage3", "stage4")


def candidate_scores(models: dict, data, sizes: list[int], work: Path) -> list[dict]:
    """(stage, size) -> val / test µAP after NES, with the ranked lists for the bootstrap."""
    from isc.extract.describe import resolve_input_size
    from isc.io import read_ground_truth
    from isc.metrics import evaluate

    gts = {k: read_ground_truth(data.ground_truth(k)) for k in ("val", "test")}
    rows = []
    for stage, model in models.items():
        for size in sizes:
            desc = nes_descriptors(model, data, Path(tempfile.mkdtemp(prefix=f"{stage}-{size}-", dir=work)),
                                   size or None, False)
            row = {"candidate": f"{stage} @ {resolve_input_size(model, size)} px"}
            for k, gt in gts.items():
                res = evaluate(desc, gt)
                row[k] = res.metrics.average_precision
                row[f"_ranked_{k}"] = res.ranked
            rows.append(row)
    return rows


def seed_report(rows: list[dict], val_gt, n_boot: int) -> dict:
    from isc.metrics import bootstrap_average_precision

    by_val = sorted(range(len(rows)), key=lambda i: -rows[i]["val"])
    pick, runner = by_val[0], by_val[1]
    best = max(range(len(rows)), key=lambda i: rows[i]["test"])
    boot = bootstrap_average_precision([rows[pick]["_ranked_val"], rows[runner]["_ranked_val"]], val_gt, n_boot=n_boot)
    lo, hi, _ = boot.difference(0, 1)
    return {"pick": rows[pick]["candidate"], "pick_test": rows[pick]["test"], "test_best": rows[best]["candidate"],
            "best_test": rows[best]["test"], "regret": rows[best]["test"] - rows[pick]["test"],
            "val_gap": rows[pick]["val"] - rows[runner]["val"], "gap_ci": (lo, hi), "hit": pick == best,
            # the stage alone (any size): does val at least choose the right weights?
            "stage_hit": _stage(rows[pick]["candidate"]) == _stage(rows[best]["candidate"])}


def _stage(candidate: str) -> str:
    return candidate.split(" @ ")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="folder of the main job's mlflow.db")
    p.add_argument("--experiment-name", default="isc")
    p.add_argument("--source", default="", help="photo folder for make-mini (default: the bundled photos)")
    p.add_argument("--seeds", default="0,1,2", help="make-mini seeds, comma-separated")
    p.add_argument("--sizes", default="0,224", help="input sides, comma-separated; 0 = the model's training size")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--work-dir", default="")
    args = p.parse_args(argv)

    import mlflow

    from isc.contract import Tag
    from isc.data.mini import make_mini
    from isc.io import read_ground_truth
    from isc.models import load_model

    store = Path(args.store).resolve()
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    tags = _main_tags(store, args.experiment_name)
    models = {s: load_model(tags[f"{Tag.STEP_RUN_PREFIX}train_{s}"]) for s in STAGES
              if f"{Tag.STEP_RUN_PREFIX}train_{s}" in tags}
    if len(models) < 2:
        p.error(f"--store {store}: no finished main job with two stage models in experiment {args.experiment_name!r}")
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="isc-valpower-"))
    reports = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        data = make_mini(work / f"mini{seed}", source=args.source or None, seed=seed, size="default", overwrite=True)
        rows = candidate_scores(models, data, sizes, work)
        rep = seed_report(rows, read_ground_truth(data.ground_truth("val")), args.bootstrap)
        reports.append(rep)
        print(f"\nseed {seed} ({time.perf_counter() - t0:.0f} s): val / test µAP after NES")
        for r in rows:
            print(f"  {r['candidate']:<18} val {r['val']:.4f}  test {r['test']:.4f}")
        lo, hi = rep["gap_ci"]
        print(f"  val picks {rep['pick']} (test {rep['pick_test']:.4f}); test-best {rep['test_best']} "
              f"({rep['best_test']:.4f}); regret {rep['regret']:.4f}; val gap to runner-up {rep['val_gap']:+.4f}, "
              f"paired 95% interval {lo:+.3f} to {hi:+.3f} (width {hi - lo:.3f})")
    hits = sum(r["hit"] for r in reports)
    stage_hits = sum(r["stage_hit"] for r in reports)
    mean_regret = sum(r["regret"] for r in reports) / len(reports)
    widths = [r["gap_ci"][1] - r["gap_ci"][0] for r in reports]
    print(f"\nval picked the test-best candidate in {hits} of {len(reports)} seeds (its stage in {stage_hits}); "
          f"mean regret {mean_regret:.4f} test µAP; paired interval width on val {min(widths):.3f}-{max(widths):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
