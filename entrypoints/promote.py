"""``isc promote`` / MLproject ``promote``: register the best evaluated model and move ``@champion``.

    isc promote --experiment isc --ground-truth data/mini/ground_truth_test.csv [--min-improvement 0.01]
    isc promote --rollback [--model-name isc-descriptor]     # @champion back to @previous
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from isc.cliutil import Parser, nonnegative_float, optional_str, str2bool
from isc.contract import Tag
from isc.errors import ConfigError, DescriptorFileError
from registry.model_logging import DEFAULT_MODEL_NAME
from registry.promote import promote, rollback


def build_parser() -> Parser:
    p = Parser(prog="isc promote", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", type=optional_str, default=None,
                   help="experiment (name or id) holding the evaluation runs (default: the active/\"isc\" one)")
    p.add_argument("--ground-truth", type=optional_str, default=None,
                   help="ground-truth CSV the candidates were scored on (selects runs by its fingerprint)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    p.add_argument("--min-improvement", type=nonnegative_float, default=0.0,
                   help="µAP margin the candidate must beat the champion by (absolute)")
    p.add_argument("--force", type=str2bool, nargs="?", const=True, default=False,
                   help="move @champion even if the candidate does not win")
    p.add_argument("--on-other-gt", choices=("error", "keep"), default="error",
                   help="@champion scored on another ground truth: fail (error) or register and keep it (keep)")
    p.add_argument("--rollback", type=str2bool, nargs="?", const=True, default=False,
                   help="move @champion back to @previous instead of promoting")
    p.add_argument("--json", type=str2bool, nargs="?", const=True, default=False, help="print the result as JSON")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_id = os.environ.get("MLFLOW_RUN_ID")  # read first: ending the registration's run unsets it

    if args.ground_truth:

        from isc.io import read_ground_truth

        if not Path(args.ground_truth).exists():
            raise ConfigError("ground_truth", f"{args.ground_truth}: no such file")
        try:  # a folder (which split?), a binary file or a malformed CSV: one error line, no traceback
            read_ground_truth(args.ground_truth)
        except DescriptorFileError as exc:
            raise ConfigError("ground_truth", str(exc)) from exc
    if args.rollback:
        result = rollback(args.model_name)
    else:
        result = promote(args.experiment, args.ground_truth, args.model_name, args.min_improvement, args.force,
                         on_other_gt=args.on_other_gt)
    if run_id:  # under `mlflow run` (the main job): the decision goes on this step's run; the summary prints it
        from mlflow import MlflowClient


        client = MlflowClient()
        client.set_tag(run_id, Tag.PROMOTION_ACTION, result.action)
        client.set_tag(run_id, Tag.PROMOTION_MESSAGE, result.message[:4000])
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.promote")
