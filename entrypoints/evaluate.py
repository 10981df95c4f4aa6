"""``isc evaluate`` / MLproject ``evaluate``: score a descriptor h5 with the official ISC21 protocol.

Prints the metrics JSON (and nothing else) on stdout; logs params, metrics, tags and the
``evaluation/`` artifacts (metrics.json, pr_curve.png, gallery.png) to the MLflow run -- the launcher's
run under ``mlflow run``, a new one otherwise. :func:`isc.evaluation.run_evaluation` does the work (and
does the same inside a caller's run).
"""

from __future__ import annotations

import contextlib
import json
import sys

from isc import tracking
from isc.cliutil import Parser, nonnegative_int, optional_str, positive_int, str2bool
from isc.contract import Step, Tag
from isc.evaluation import (
    DEFAULT_BOOTSTRAP,
    check_output_dir,
    extraction_settings,
    prepare_inputs,
    run_evaluation,
)
from isc.knn import DEFAULT_BATCH_SIZE
from isc.limits import MAX_BOOTSTRAP, check_bootstrap
from isc.metrics import PROTOCOLS


def build_parser() -> Parser:
    p = Parser(prog="isc evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--descriptors", required=True, help="descriptor h5: path, run id or MLflow artifact URI")
    p.add_argument("--ground-truth", required=True, help="ground-truth CSV (query_id,reference_id)")
    p.add_argument("--before", type=optional_str, default=None, help="raw descriptors to compare with")
    p.add_argument("--protocol", choices=PROTOCOLS, default="official")
    p.add_argument("--max-results", type=positive_int, default=500_000, help="cap of --protocol max_results")
    p.add_argument("--knn", type=positive_int, default=10, help="results per query of --protocol knn")
    p.add_argument("--metric", choices=("l2", "ip"), default="l2")
    p.add_argument("--data", type=optional_str, default=None, help="DISC21 root: adds a match gallery")
    p.add_argument("--model-ref", type=optional_str, default=None, help="run id / model URI of the model")
    p.add_argument("--nes-bank", type=optional_str, default=None, help="artifact URI of the NES bank")
    p.add_argument("--allow-large-dim", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="queries per search")
    p.add_argument("--bootstrap", type=nonnegative_int, default=DEFAULT_BOOTSTRAP,
                   help=f"query-bootstrap replicates for the 95%% µAP interval (0 = none; at most {MAX_BOOTSTRAP:,})")
    p.add_argument("--experiment-name", type=optional_str, default=None)
    p.add_argument("--output-dir", type=optional_str, default=None,
                   help="also keep the artifacts here (metrics.json, pr_curve.png, gallery.png)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace the artifacts of an earlier evaluation in --output-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Validate every input before the run opens: a bad file fails fast and leaves no empty run.
    check_bootstrap(args.bootstrap)
    check_output_dir(args.output_dir, {"--descriptors": args.descriptors, "--ground-truth": args.ground_truth,
                                       "--before": args.before}, args.overwrite)
    inputs = prepare_inputs(args.descriptors, args.ground_truth, args.before, args.allow_large_dim, args.data)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON only
        with tracking.tracked_run(
            experiment=args.experiment_name, run_name="evaluate", tags={Tag.STEP: Step.EVALUATE}
        ):
            out = run_evaluation(
                inputs.desc,
                inputs.gt,
                before=inputs.before,
                protocol=args.protocol,
                max_results=args.max_results,
                knn=args.knn,
                metric=args.metric,
                data=args.data,
                model_ref=args.model_ref,
                nes_bank=args.nes_bank,
                allow_large_dim=args.allow_large_dim,
                batch_size=args.batch_size,
                output_dir=args.output_dir,
                gt_path=inputs.gt_path,
                bootstrap=args.bootstrap,
                settings=extraction_settings(args.descriptors, args.before),
            )
            given = {
                "descriptors": args.descriptors,
                "ground_truth": args.ground_truth,
                "before": args.before,
            }
            tracking.log_params({k: v for k, v in given.items() if v is not None})
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.evaluate")
