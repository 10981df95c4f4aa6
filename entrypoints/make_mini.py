"""``isc data make-mini`` / MLproject ``make_mini``: build a DISC21-shaped mini dataset from photos.

The library function (:func:`isc.data.mini.make_mini`) logs nothing; this entry point logs the
parameters, the image counts and the ground-truth files to MLflow when it runs under ``mlflow run``
(``MLFLOW_RUN_ID`` set), or always with ``--track true``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from isc import tracking
from isc.cliutil import Parser, nonnegative_int, optional_str, str2bool
from isc.contract import Step, Tag
from isc.data.mini import MANIFEST, SIZES, make_mini
from isc.errors import ConfigError
from isc.io import read_ground_truth

log = logging.getLogger(__name__)


def build_parser() -> Parser:
    p = Parser(prog="isc data", description="Build DISC21-shaped datasets.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    m = sub.add_parser("make-mini", help="mini dataset from bundled photos or a folder of photos")
    m.add_argument(
        "--source", type=optional_str, default=None, help="folder of photos (default: bundled photos)"
    )
    m.add_argument("--out", default="data/mini", help="output folder (must be absent or empty)")
    m.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (same seed, same dataset)")
    m.add_argument("--size", default="default", choices=sorted(SIZES), help="dataset size preset")
    m.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False, help="replace --out")
    m.add_argument(
        "--track", type=str2bool, default=None, help="log to MLflow (default: only under mlflow run)"
    )
    return p


def summary(root: Path) -> dict[str, int]:
    """Image counts and query-split sizes of a built dataset (the metrics this step logs)."""
    gt = read_ground_truth(root / "ground_truth.csv")
    counts = {
        "n_queries": len(gt.queries),
        "n_positive_queries": gt.n_positives,
        "n_distractor_queries": len(gt.queries) - gt.n_positives,
        "n_references": sum(1 for _ in (root / "reference_images").glob("*.jpg")),
        "n_training": sum(1 for _ in (root / "training_images").glob("*.jpg")),
    }
    for split in ("train", "val", "test"):
        counts[f"n_queries_{split}"] = len(read_ground_truth(root / f"ground_truth_{split}.csv").queries)
    return counts


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "make-mini":  # pragma: no cover - argparse enforces the choice
        raise ConfigError("command", f"unknown command {args.command}")
    track = args.track if args.track is not None else bool(os.environ.get("MLFLOW_RUN_ID"))
    if not track:
        ds = make_mini(args.out, source=args.source, seed=args.seed, size=args.size, overwrite=args.overwrite)
        counts = summary(ds.root)
        print(f"mini dataset at {ds.root}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return 0
    with tracking.tracked_run(run_name="make_mini", tags={Tag.STEP: Step.MAKE_MINI}):
        tracking.log_params(
            {"source": args.source or "", "out": args.out, "seed": args.seed, "size": args.size}
        )
        ds = make_mini(args.out, source=args.source, seed=args.seed, size=args.size, overwrite=args.overwrite)
        counts = summary(ds.root)
        tracking.log_params({"data_root": str(ds.root)})
        tracking.log_metrics(counts)
        for name in ("ground_truth.csv", "ground_truth_train.csv", "ground_truth_val.csv",
                     "ground_truth_test.csv", MANIFEST):  # fmt: skip
            tracking.log_artifact(ds.root / name, "data")
    print(f"mini dataset at {ds.root}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.make_mini")
