"""``isc match`` / MLproject ``match``: a matching-track CSV from descriptors.

Writes ``query_id,reference_id,score`` (best first, at most 500,000 rows, no duplicate pair; score =
-squared L2 or the inner product) from the global top ``--max-results`` pairs over all queries -- the
same candidates the isc2021 ``--max_results`` evaluation scores. Logs the row count when an MLflow run
is active or the command runs under ``mlflow run``. An existing ``--output`` is replaced only with
``--overwrite true``; an output that is the descriptor file itself is always refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from isc import tracking
from isc.cliutil import Parser, positive_int, str2bool
from isc.contract import Step, Tag
from isc.errors import ConfigError
from isc.evaluation import descriptor_path
from isc.fileutil import check_outputs
from isc.io import MAX_MATCHES, read_descriptors, write_matches_csv
from isc.knn import DEFAULT_BATCH_SIZE, knn_backend
from isc.matching import match_descriptors


def build_parser() -> Parser:
    p = Parser(prog="isc match", description=__doc__.splitlines()[0])
    p.add_argument("--descriptors", required=True, help="descriptor h5: path, run id or MLflow artifact URI")
    p.add_argument("--output", default="outputs/match/matches.csv", help="CSV to write")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output (default: refuse)")
    p.add_argument("--max-results", type=positive_int, default=MAX_MATCHES, help="rows (<= 500000)")
    p.add_argument("--metric", choices=("l2", "ip"), default="l2")
    p.add_argument("--allow-large-dim", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    return p


def _log(args, n_matches: int) -> None:
    tracking.log_params({"descriptors": args.descriptors, "max_results": args.max_results,
                         "knn_backend": knn_backend()})  # fmt: skip
    tracking.log_params({"metric": args.metric}, prefix="match.")
    tracking.log_metrics({"n_matches": n_matches})


def main(argv: list[str] | None = None) -> int:
    import mlflow

    args = build_parser().parse_args(argv)
    if args.max_results > MAX_MATCHES:
        raise ConfigError(
            "--max-results", f"the matching track allows at most {MAX_MATCHES} rows, got {args.max_results}"
        )
    desc_path = descriptor_path(args.descriptors)
    check_outputs({"--output": Path(args.output)}, {"--descriptors": desc_path}, args.overwrite)
    desc = read_descriptors(desc_path, allow_large_dim=args.allow_large_dim)
    qids, rids, scores = match_descriptors(desc, args.max_results, args.metric, args.batch_size)
    path = write_matches_csv(args.output, qids, rids, scores)
    summary = {"output": str(path), "n_matches": len(qids), "metric": args.metric}
    if mlflow.active_run() is not None:
        _log(args, len(qids))
    elif os.environ.get("MLFLOW_RUN_ID"):
        with contextlib.redirect_stdout(sys.stderr):
            with tracking.tracked_run(run_name="match", tags={Tag.STEP: Step.MATCH}):
                _log(args, len(qids))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.match")
