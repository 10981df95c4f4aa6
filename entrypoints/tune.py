"""``isc tune`` / MLproject ``tune``: Optuna study over margins, memory-bank size and lr of one stage.

Trials are short fine-tunes of a recipe stage (default: the profile's last, stage 4) from that stage's
hand-off checkpoint, scored by val µAP after negative embedding subtraction.

    isc tune --data data/mini --n-trials 8 --start-from <stage3 run id>:1   # one worker, demo stage4
    isc tune ... & isc tune ...                                             # two workers, 8 trials in all
    isc tune ... --storage postgresql://user:pw@db/optuna                   # workers on several machines
"""

from __future__ import annotations

from pathlib import Path

from isc.cliutil import Parser, optional_str, positive_int
from isc.train.config import parse_overrides
from isc.tune import DEFAULT_TUNE_CONFIG, load_tune_config, run_study


def build_parser() -> Parser:
    p = Parser(prog="isc tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="isc/configs/tune.yaml", help="tune YAML (search space, pruner, ...)")
    p.add_argument("--data", default="data/mini", help="DISC21-shaped dataset folder")
    p.add_argument("--n-trials", type=positive_int, default=4,
                   help="study-wide number of finished trials (all workers together)")
    p.add_argument("--study-name", default="isc-tune")
    p.add_argument("--storage", type=optional_str, default=None,
                   help="Optuna RDB URL (default sqlite:///<project>/optuna.db)")
    g = p.add_argument_group("overrides of the tune config")
    g.add_argument("--profile", type=optional_str, default=None, help="driver profile (demo, full, smoke)")
    g.add_argument("--stage", type=optional_str, default=None,
                   help="stage of the profile to tune (default: its last fine-tuning stage)")
    g.add_argument("--start-from", type=optional_str, default=None,
                   help="the stage's hand-off checkpoint, as the profile hands it on (<run id>:N or run id)")
    g.add_argument("--overrides", type=optional_str, default=None,
                   help="YAML mapping of training options fixed for every trial (the main job's); sampled values win")
    g.add_argument("--epochs-per-trial", type=positive_int, default=None)
    g.add_argument("--split", type=optional_str, default=None, help="validation split name (never 'test')")
    g.add_argument("--ground-truth", type=optional_str, default=None, help="explicit validation ground-truth CSV")
    g.add_argument("--experiment", type=optional_str, default=None, help="MLflow experiment of the study run")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)


    config = args.config
    if config in ("isc/configs/tune.yaml", "tune") and not Path(config).is_file():
        config = str(DEFAULT_TUNE_CONFIG)  # launched from another working directory
    job_overrides = None
    if args.overrides:

        job_overrides = parse_overrides(args.overrides)
    cfg = load_tune_config(config, profile=args.profile, stage=args.stage, start_from=args.start_from,
                           job_overrides=job_overrides, epochs_per_trial=args.epochs_per_trial,
                           split=args.split, ground_truth=args.ground_truth, experiment=args.experiment)
    result = run_study(cfg, args.data, args.n_trials, args.study_name, args.storage)
    c = result.counts
    print(f"study {result.study_name} ({result.storage}): {c['finished']} finished trials "
          f"({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed), {result.n_trials_here} run here")
    if result.best_value is not None:
        print(f"best val µAP {result.best_value:.4f} (trial {result.best_trial}, run {result.best_run_id}): "
              f"{result.best_params}")
    print(f"MLflow study run: {result.parent_run_id}; dashboard: optuna-dashboard {result.storage} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.tune")
