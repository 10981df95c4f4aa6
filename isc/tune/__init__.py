"""Optuna study over the contrastive-loss margins, the memory-bank size and the learning rate.

Why: the recipe's margins/memory/lr were tuned for 4-8 GPUs and 1M images; on another dataset or
budget they need re-tuning. A trial is a short fine-tune of one stage of a driver profile (default: its
last, stage 4) from that stage's hand-off checkpoint (stage 3's ``checkpoint_0001``), so the values are
tuned where they are used. After every epoch its model is scored by µAP (official ISC21 protocol) on the
*validation* split (``ground_truth_val.csv`` queries vs all references) after negative embedding
subtraction -- the number the main job gives every stage -- which also drives pruning. The test split is
never used here: a ground truth that shares queries with ``ground_truth_test.csv`` is refused. The main
job turns the best trial into a candidate model (:func:`isc.candidates.tuned_candidate`).

MLflow layout (manual logging; optuna-integration's ``MLflowCallback`` is deprecated):

* one *study run* (tags ``isc.step=tune``, ``optuna.study``): search space, study name, storage URL
  (password removed), sampler, pruner as params; best value (metric ``best_value``), best params (tags
  ``best_params.<name>`` + ``optuna/best_params.json``) and Optuna plots as artifacts. Its id is kept in
  the study's user attr ``mlflow_parent_run_id`` so every worker (and a resumed study) nests under it;
* one nested *trial run* per trial (tags ``optuna.study``, ``optuna.trial``, ``optuna.state`` and the
  contract's ``Tag.TUNE_STUDY``/``TUNE_TRIAL``/``TUNE_PARAMS``): the trial params, per-epoch
  ``val_average_precision`` (after NES), ``val_average_precision_raw``, ``val_recall_p90`` (step =
  epoch), the final ``objective``. Trial state -> run status: COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED (tag
  ``isc.error``). ``trial.user_attrs['mlflow_run_id']`` links back.

Parallel workers: every worker runs the same command against one RDB storage (SQLite next to the
MLflow store by default, PostgreSQL for several machines). Trials are admitted one at a time under a
lock (a file lock beside a SQLite file, a PostgreSQL advisory lock) that is held from the count until
the trial exists, so ``n_trials`` is an exact study-wide total of finished (complete + pruned + failed)
trials however many workers run. (Optuna's ``MaxTrialsCallback`` only checks after a trial ends, so two
workers can overshoot by one each.) Heartbeats mark trials of killed workers FAIL, and
``RetryHeartbeatStaleTrialCallback`` re-enqueues them once with the same params; a retried failure does
not count towards ``n_trials`` (its retry does).

Modules, one job each: :mod:`~isc.tune.space` (search space + tune YAML schema, sampler/pruner),
:mod:`~isc.tune.storage` (RDB storage, admission gate, trial counts), :mod:`~isc.tune.objective` (one
trial: training, validation scoring, its nested run), :mod:`~isc.tune.study` (the study driver, summary
and plots). The names below are re-exported so ``from isc.tune import ...`` is the public API.
"""

from isc.tune.objective import OBJECTIVE_METRIC, SYSTEMATIC_ERRORS, ValidationSet, resolve_validation_gt
from isc.tune.space import (
    CONFIG_DIR,
    DEFAULT_TUNE_CONFIG,
    PARAM_TYPES,
    ParamSpec,
    TuneConfig,
    build_pruner,
    build_sampler,
    describe_component,
    load_tune_config,
    parse_param_spec,
)
from isc.tune.storage import AdmissionGate, default_storage_url, make_storage, trial_counts
from isc.tune.study import PARENT_ATTR, TuneResult, log_study_summary, run_study

__all__ = [
    "CONFIG_DIR", "DEFAULT_TUNE_CONFIG", "OBJECTIVE_METRIC", "PARAM_TYPES", "PARENT_ATTR", "SYSTEMATIC_ERRORS",
    "AdmissionGate", "ParamSpec", "TuneConfig", "TuneResult", "ValidationSet", "build_pruner", "build_sampler",
    "default_storage_url", "describe_component", "load_tune_config", "log_study_summary", "make_storage",
    "parse_param_spec", "resolve_validation_gt", "run_study", "trial_counts",
]
