"""One trial: train with the sampled values, score on the validation split after every epoch, report.

Why its own module: this is the only place that knows what a trial *is* (training seam, validation
scoring, the nested MLflow run and how Optuna's trial states map onto run statuses).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isc.contract import BASELINE_TRIAL_PARAM, Step, Tag
from isc.errors import BadImageError, BadImagesError, ConfigError, DescriptorFileError, ISCError
from isc.tracking import log_metrics, log_params
from isc.tune.space import TuneConfig
from isc.tune.storage import AdmissionGate

log = logging.getLogger(__name__)

OBJECTIVE_METRIC = "val_average_precision"
BASELINE_ATTR = "baseline"  # user attr of the trial that runs the stage's own values
# Errors that would fail every trial the same way (bad option, unreadable data): they stop the worker.
# Anything else (divergence, out of memory, ...) fails only its trial and the study goes on.
SYSTEMATIC_ERRORS = (ConfigError, BadImageError, BadImagesError, DescriptorFileError)


def resolve_validation_gt(data: str | Path, split: str = "val", ground_truth: str | Path | None = None) -> Path:
    """The ground truth trials are scored on; refuses the test split or anything sharing its queries."""
    from isc.data.disc21 import DISC21
    from isc.io import read_ground_truth

    ds = DISC21(data)
    if split in ("test", "all", "") and not ground_truth:
        raise ConfigError("split", f"tuning on '{split or 'all'}' is refused: trials must be scored on a "
                                   "validation split (ground_truth_val.csv), never the test split")
    path = Path(ground_truth).expanduser() if ground_truth else ds.ground_truth(split)
    if not path.is_file():
        raise ConfigError("ground_truth" if ground_truth else "split",
                          f"{path}: no such ground-truth file (`isc data make-mini` writes ground_truth_val.csv)")
    test = ds.ground_truth("test")
    if test.is_file():
        if path.resolve() == test.resolve():
            raise ConfigError("ground_truth", f"{path} is the test split; tuning on it is refused")
        shared = set(read_ground_truth(path).queries) & set(read_ground_truth(test).queries)
        if shared:
            raise ConfigError("ground_truth", f"{path} shares {len(shared)} queries with the test split {test} "
                                              f"(e.g. {sorted(shared)[:3]}); tuning on it is refused")
    elif path.name.endswith("_test.csv"):
        raise ConfigError("ground_truth", f"{path} is named as a test split; tuning on it is refused")
    return path


@dataclass
class ValScore:
    """One scoring of a model on the validation split: after NES (the objective) and before."""

    nes: Any  # isc.metrics.EvalResult of the negatively-subtracted descriptors
    raw: Any  # isc.metrics.EvalResult of the raw descriptors

    def metrics(self) -> dict[str, float]:
        return {OBJECTIVE_METRIC: float(self.nes.metrics.average_precision),
                "val_recall_p90": float(self.nes.metrics.recall_p90),
                f"{OBJECTIVE_METRIC}_raw": float(self.raw.metrics.average_precision)}


class ValidationSet:
    """Validation queries (those listed in the GT) vs all references, official protocol, after NES.

    Why after NES: the driver scores every stage (and promotion compares them) on descriptors
    post-processed by negative embedding subtraction against the training images, with the contract's
    constants; a trial is scored the same way, so its value is the number its model would get there. NES
    acts on each vector alone, so subtracting only the val queries gives the driver's vectors for them.
    """

    def __init__(self, data: str | Path, gt_path: str | Path, batch_size: int = 64, nes: Any = None):
        from isc.data.disc21 import DISC21
        from isc.io import read_ground_truth
        from isc.postprocess import NESConfig

        ds = DISC21(data)
        ds.validate("qrt")
        self.gt_path = Path(gt_path)
        self.gt = read_ground_truth(self.gt_path)
        queries = dict(ds.images("query"))
        missing = [q for q in self.gt.queries if q not in queries]
        if missing:
            raise ConfigError("ground_truth", f"{self.gt_path}: {len(missing)} queries have no image in "
                                              f"{ds.query_dir} (e.g. {missing[:3]})")
        self.query_ids = sorted(self.gt.queries)
        self.query_paths = [queries[q] for q in self.query_ids]
        refs = ds.images("reference")
        self.reference_ids = [r for r, _ in refs]
        self.reference_paths = [p for _, p in refs]
        self.bank_paths = [p for _, p in ds.images("train")]  # NES negatives: training images, never references
        self.nes = (nes or NESConfig()).validate()
        self.nes.check_bank(len(self.bank_paths), ds.training_dir)
        self.batch_size = int(batch_size)

    def score(self, model: Any) -> ValScore:
        """µAP of ``model`` (any ISCNet, train or eval mode; its mode is restored) before and after NES."""
        from isc.extract.describe import describe_images
        from isc.io import Descriptors
        from isc.metrics import evaluate
        from isc.postprocess import postprocess_descriptors

        q, r, t = (describe_images(model, paths, batch_size=self.batch_size)
                   for paths in (self.query_paths, self.reference_paths, self.bank_paths))
        post = postprocess_descriptors(q, r, t, self.nes)
        source = f"validation ({self.gt_path.name})"
        return ValScore(
            nes=evaluate(Descriptors(post.query, self.query_ids, post.reference, self.reference_ids), self.gt,
                         protocol="official", source=source),
            raw=evaluate(Descriptors(q, self.query_ids, r, self.reference_ids), self.gt, protocol="official",
                         source=source),
        )


def _train_trial(cfg: Any, epoch_callback: Callable[[int, Any], Any]) -> Any:
    """Seam to the training loop (``isc.train.train``); trials run it in-process."""
    from isc.train import train

    return train(cfg, epoch_callback=epoch_callback)


@contextlib.contextmanager
def _trial_run(study_name: str, trial: Any) -> Iterator[Any]:
    """Nested MLflow run of one trial; pruned -> KILLED (tag optuna.state=PRUNED), error -> FAILED.

    (``mlflow.start_run`` as a context manager would end a pruned trial FAILED.)
    """
    import mlflow
    import optuna

    parent = mlflow.active_run()
    # Under `mlflow run` the study run came from MLFLOW_RUN_ID; start_run without a run id would resume it
    # (the first trial then logged into the study run itself). The study run is open now: drop the variable.
    os.environ.pop("MLFLOW_RUN_ID", None)
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                           experiment_id=parent.info.experiment_id if parent is not None else None,
                           tags={"optuna.study": study_name, "optuna.trial": str(trial.number),
                                 Tag.TUNE_STUDY: study_name, Tag.TUNE_TRIAL: str(trial.number),
                                 Tag.STEP: Step.TUNE_TRIAL, "optuna.state": "RUNNING"})
    run_id = run.info.run_id
    client = mlflow.MlflowClient()

    def finish(state: str, status: str, error: str | None = None) -> None:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, "optuna.state", state)
            client.set_tag(run_id, Tag.STEP, Step.TUNE_TRIAL)  # the training loop tagged it "train"
            if error:
                client.set_tag(run_id, Tag.ERROR, error[:4000])
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status)
        else:  # the training loop already closed it: set the status without touching the parent
            client.set_terminated(run_id, status=status)

    try:
        yield run
    except optuna.TrialPruned as exc:
        finish("PRUNED", "KILLED", f"pruned: {exc}")
        raise
    except KeyboardInterrupt:
        finish("FAIL", "KILLED", "interrupted")
        raise
    except BaseException as exc:
        finish("FAIL", "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    else:
        finish("COMPLETE", "FINISHED")


def _objective_factory(cfg: TuneConfig, data: str, study_name: str, val: ValidationSet, gate: AdmissionGate,
                       errors: list[BaseException]) -> Callable[[Any], float]:
    import mlflow
    import optuna


    stage = cfg.tuned_stage()

    def objective(trial: Any) -> float:
        gate.release()  # the trial exists now: other workers may be admitted
        params = {name: spec.suggest(trial) for name, spec in cfg.search_space.items()}
        try:
            with _trial_run(study_name, trial) as run:
                trial.set_user_attr("mlflow_run_id", run.info.run_id)
                mlflow.set_tags({Tag.TUNE_PARAMS: json.dumps(params, sort_keys=True), Tag.TUNE_STAGE: stage.name})
                log_params({**params, BASELINE_TRIAL_PARAM: bool(trial.user_attrs.get(BASELINE_ATTR)),
                            "epochs_per_trial": cfg.epochs_per_trial, "profile": cfg.profile,
                            "tuned_stage": stage.name, "config": stage.config, "start_from": cfg.start_from or "",
                            "validation_split": cfg.split, "validation_ground_truth": str(val.gt_path)})
                train_cfg = cfg.trial_train_config(data, params)
                last: dict[str, float] = {}

                def on_epoch(epoch: int, model: Any) -> dict[str, float]:
                    metrics = val.score(model).metrics()
                    value = last["value"] = metrics[OBJECTIVE_METRIC]
                    log_metrics(metrics, step=int(epoch))
                    trial.report(value, int(epoch))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch}: val µAP {value:.4f} below the pruner's bar")
                    return None  # already logged (step = epoch)

                _train_trial(train_cfg, on_epoch)
                if "value" not in last:
                    raise ISCError("training finished without an epoch callback: no validation score")
                log_metrics({"objective": last["value"]})
                return last["value"]
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            errors.append(exc)
            raise

    return objective
