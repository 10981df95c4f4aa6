"""``isc main`` / MLproject ``main``: the whole pipeline, data to a promoted champion (see isc/driver.py)."""

from __future__ import annotations

import time

from isc.cliutil import (
    Parser,
    nonnegative_int,
    optional_nonnegative_int,
    optional_str,
    positive_int,
    str2bool,
)
from isc.contract import Step, Tag
from isc.nodes import Layout
from isc.tracking import tracked_run


def build_parser() -> Parser:
    p = Parser(prog="isc main", description=__doc__)
    p.add_argument("--data", default="data/mini", help="DISC21-layout folder; built as a mini dataset if absent")
    p.add_argument("--source", type=optional_str, default=None, help="photos for the mini dataset (default: bundled)")
    p.add_argument("--profile", default="demo",
                   help="demo (the recipe's chain in miniature: EfficientNet-Lite0 on CPU), full (the seed's "
                        "stages on DISC21 with GPUs) or smoke (a seconds-long pipeline check)")
    p.add_argument("--overrides", type=optional_str, default=None,
                   help="YAML mapping fixed on top of every training stage (e.g. '{input_size: 32}')")
    p.add_argument("--n-trials", type=nonnegative_int, default=3, help="Optuna trials (0 skips tuning)")
    p.add_argument("--force", type=str2bool, default=False, help="re-run every step instead of reusing finished runs")
    p.add_argument("--settings-sizes", type=optional_str, default=None,
                   help="input sides (px, comma-separated, 0 = training size) of the val grid of extraction "
                        "settings; default: the profile's (demo and full: 0,160,224; 0 alone with "
                        "--settings-tta false turns the grid off)")
    p.add_argument("--settings-tta", type=optional_str, default=None,
                   help="TTA values of that grid (default: the profile's; demo and full: false,true)")
    p.add_argument("--settings-top", type=optional_nonnegative_int, default=None,
                   help="the grid is run for this many candidates, the best by val µAP at their training size "
                        "(default: the profile's; demo: 1, full: 2; 0 = every candidate)")
    p.add_argument("--settings-tta-sizes", type=optional_nonnegative_int, default=None,
                   help="TTA is tried at this many sizes, the best without it (default: the profile's, 1; "
                        "0 = every size)")
    p.add_argument("--model-name", default="isc-descriptor", help="registered model name")
    p.add_argument("--experiment-name", type=optional_str, default=None)
    p.add_argument("--nproc-per-node", type=positive_int, default=1,
                   help="processes (GPUs) of every training stage and extraction, under torchrun when > 1; each "
                        "takes global batch / processes items per step")
    p.add_argument("--nnodes", type=positive_int, default=1,
                   help="machines of every training stage and extraction; machines 1.. run `isc join` (isc/nodes.py)")
    p.add_argument("--rdzv-endpoint", type=optional_str, default=None,
                   help="with --nnodes > 1: this machine's HOST:PORT as the others reach it (PORT and PORT + 1)")
    p.add_argument("--join-timeout", type=positive_int, default=900,
                   help="seconds the other machines have to join before stage 0 (with --nnodes > 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from isc.driver import run_main
    from isc.recipe import check_arguments, check_processes

    args = build_parser().parse_args(argv)
    check_arguments(args.profile, args.n_trials, args.overrides or "", args.settings_sizes or "",
                    args.settings_tta or "", args.settings_top, args.settings_tta_sizes)  # before any run opens

    layout = Layout(args.nproc_per_node, args.nnodes, args.rdzv_endpoint or "")
    layout.check()
    check_processes(args.profile, layout.world_size, args.overrides or "")
    # A name that says what ran and when (under `mlflow run` the launcher's run has a random one).
    name = f"main-{args.profile}-{time.strftime('%Y%m%d-%H%M')}"
    with tracked_run(experiment=args.experiment_name, run_name=name, tags={Tag.STEP: Step.MAIN}):
        mlflow.set_tag("mlflow.runName", name)
        grid = {"sizes": args.settings_sizes, "tta": args.settings_tta, "top": args.settings_top,
                "tta_sizes": args.settings_tta_sizes}
        run_main(args.data, args.source, args.profile, args.n_trials, args.force, args.model_name,
                 overrides=args.overrides or "", layout=layout, settings_grid=grid, join_timeout_s=args.join_timeout)
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.main")
