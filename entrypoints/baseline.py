"""``isc baseline`` / MLproject ``baseline``: hash/thumbnail descriptors of a DISC21 folder, evaluated.

Writes ``OUTPUT_DIR/<method>.h5`` (an existing one is replaced only with ``--overwrite true``) (descriptor-track h5 of every query and reference image), scores it
on the ground truth (default: the held-out ``ground_truth_test.csv`` when the dataset has one, else the
full ``ground_truth.csv``) with the official protocol, logs it to MLflow like ``isc evaluate`` (plus tag
``isc.baseline``) and prints the metrics JSON on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import mlflow

from isc import tracking
from isc.baselines import METHODS, compute_descriptors
from isc.cliutil import Parser, optional_str, str2bool
from isc.contract import ARTIFACT_DESCRIPTORS, Step, Tag
from isc.data.disc21 import DISC21
from isc.errors import ConfigError, DescriptorFileError
from isc.evaluation import run_evaluation
from isc.fileutil import check_outputs
from isc.io import read_ground_truth, write_descriptors


def build_parser() -> Parser:
    p = Parser(prog="isc baseline", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/mini", help="DISC21-shaped root")
    p.add_argument("--method", choices=sorted(METHODS), default="phash")
    p.add_argument("--ground-truth", type=optional_str, default=None, help="GT CSV (default: see above)")
    p.add_argument("--output-dir", default="outputs/baseline")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace the descriptors and artifacts of an earlier baseline in --output-dir")
    p.add_argument("--experiment-name", type=optional_str, default=None)
    return p


def default_ground_truth(root: DISC21) -> Path:
    """The held-out test split when the dataset has one, else the full ground truth."""
    test = root.ground_truth("test")
    return test if test.is_file() else root.ground_truth()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = DISC21(Path(args.data))
    root.validate("qr")
    gt_path = Path(args.ground_truth) if args.ground_truth else default_ground_truth(root)
    if not gt_path.exists():
        raise ConfigError("--ground-truth", f"{gt_path} does not exist")
    try:  # a folder, a binary file or a malformed CSV fails here, before any image is hashed
        read_ground_truth(gt_path)
    except DescriptorFileError as exc:
        raise ConfigError("--ground-truth", str(exc)) from exc
    out_dir = Path(args.output_dir)
    outputs = {"descriptors": out_dir / f"{args.method}.h5"}
    for name in ("metrics.json", "pr_curve.png", "gallery.png"):  # run_evaluation's artifacts
        outputs[name] = out_dir / args.method / name
    check_outputs(outputs, {"--ground-truth": gt_path}, args.overwrite, param="output_dir")
    queries, refs = root.images("query"), root.images("reference")
    if not queries or not refs:
        raise ConfigError("--data", f"{root.root} has no query or no reference images")
    q = compute_descriptors([p for _, p in queries], args.method, desc=f"{args.method} queries")
    r = compute_descriptors([p for _, p in refs], args.method, desc=f"{args.method} references")
    h5 = write_descriptors(
        Path(args.output_dir) / f"{args.method}.h5", q, [i for i, _ in queries], r, [i for i, _ in refs]
    )
    with contextlib.redirect_stdout(sys.stderr):
        with tracking.tracked_run(
            experiment=args.experiment_name, run_name=f"baseline-{args.method}", tags={Tag.STEP: Step.BASELINE}
        ):
            out = run_evaluation(h5, gt_path, data=root.root, output_dir=Path(args.output_dir) / args.method)
            mlflow.set_tags({Tag.STEP: Step.BASELINE, Tag.BASELINE: args.method})
            tracking.log_params({"method": args.method, "data": args.data, "output_dir": args.output_dir})
            tracking.log_params({"ground_truth": str(gt_path)}, prefix="resolved.")
            tracking.log_artifact(h5, artifact_path=ARTIFACT_DESCRIPTORS)
    out["method"] = args.method
    out["descriptors"] = str(h5)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.baseline")
