"""The run contract: every name one step writes and another step reads, in one place.

Steps talk to each other only through MLflow: tags on runs and model versions, artifact paths inside
runs, and model references (paths, run ids, ``runs:/``, ``models:/``). A tag renamed on the writing
side and not on the reading side breaks promotion silently, so writers and readers both take the names
from here (``tests/test_contract.py`` fails when an ``"isc.<tag>"`` literal appears anywhere else).

One run reference, from training to search::

    train run R          checkpoints/checkpoint_0005.pth.tar, model/final.pth.tar   (ARTIFACT_*)
      -> settings S      model=R; val grid of size x TTA -> isc.input_size / isc.tta (isc/settings.py)
                         (main job: the top-k candidates by val µAP at their training size)
      -> extract E       model_ref=R at S's setting; descriptors/descriptors.h5 (+ train_descriptors.h5)
      -> postprocess P   descriptors/descriptors_nes.h5, descriptors/nes_bank.h5
      -> evaluate V      Evaluation.to_tags(): isc.step=evaluate, isc.model_ref=R, isc.nes_bank, GT
      -> promote         Evaluation.from_run(V) -> registered version (PYFUNC_* layout), @champion
      -> search          models:/isc-descriptor@champion (isc.search: the pyfunc, or its weights when trusted)
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from isc.errors import ConfigError
from isc.redact import redact  # noqa: F401 -- the one redaction function, re-exported with the contract

log = logging.getLogger(__name__)


BASELINE_TRIAL_PARAM = "baseline_trial"  # trial runs' param: True for the trial run at the recipe's values
# on a study run: its best trial's run id, read by the main job (a tag older than the isc. prefix, kept so
# studies already logged still hand on their best trial)
BEST_TRIAL_RUN_TAG = "best_trial_run_id"


class Tag:
    """Tag names on runs (and, for the promotion group, on registered model versions)."""

    STEP = "isc.step"  # which entry point produced the run: one of :class:`Step`
    ERROR = "isc.error"  # why a run ended FAILED / KILLED (redacted)
    STEP_RUN_PREFIX = "isc.step_run."  # on the main run: isc.step_run.<step> = that step's run id

    # training
    STAGE = "isc.stage"
    START_KIND = "isc.start_kind"  # pretrained | init | resume
    START_CHECKPOINT = "isc.start_checkpoint"  # as the user gave it (<run id>:N, runs:/..., path)
    RESUMED_FROM_RUN = "isc.resumed_from_run"
    TRAIN_PAIRS = "isc.train_pairs"
    CHECKPOINT_URI = "isc.checkpoint_uri"  # on a training run's LoggedModel: where its weights are

    # descriptors (also the h5 attributes of descriptor files)
    MODEL_REF = "isc.model_ref"
    INPUT_SIZE = "isc.input_size"
    TTA = "isc.tta"

    # evaluation
    GT_FINGERPRINT = "isc.gt_fingerprint"
    GT_PATH = "isc.gt_path"
    PROTOCOL = "isc.protocol"
    NES_BANK = "isc.nes_bank"
    NES_PARAMS = "isc.nes_params"
    BASELINE = "isc.baseline"

    # tuning
    TUNE_STUDY_RUN = "isc.tune.study_run"
    TUNE_N_TRIALS = "isc.tune.n_trials"
    # on trial runs, on a model retrained with a trial's values, and copied onto its registered versions
    TUNE_STUDY = "isc.tune.study_name"  # the Optuna study
    TUNE_TRIAL = "isc.tune.trial"  # the trial number
    TUNE_PARAMS = "isc.tune.params"  # the trial's sampled values (JSON, typed)
    TUNE_CANDIDATE = "isc.tune.candidate"  # how the tuned model was made: trial (its own model) | retrain
    TUNE_STAGE = "isc.tune.stage"  # the profile stage that was tuned (stage4, ...)

    # registry: model-version tags written by promotion
    AVERAGE_PRECISION = "isc.average_precision"
    RECALL_P90 = "isc.recall_p90"
    SOURCE_EVAL_RUN = "isc.source_eval_run"
    GIT_COMMIT = "isc.git_commit"
    ROLLED_BACK = "isc.rolled_back"
    ROLLED_BACK_AT = "isc.rolled_back_at"
    PROMOTED_AT = "isc.promoted_at"
    PROMOTED_OVER = "isc.promoted_over"
    DUPLICATE_OF = "isc.duplicate_of"
    REGISTERED_MODEL = "isc.registered_model"
    REGISTERED_VERSION = "isc.registered_version"
    PROMOTION_PREFIX = "isc.promotion."  # registered-model tags isc.promotion.NNNN (JSON history)
    EXPORT_PREFIX = "isc.export."  # isc.export.<format> = runs:/ URI of the exported file
    # on the promote step's run: what promotion decided (the main job's summary prints it)
    PROMOTION_ACTION = "isc.promotion_action"  # promoted | registered | kept | unchanged | rolled_back
    PROMOTION_MESSAGE = "isc.promotion_message"


class Step:
    """Values of :attr:`Tag.STEP`."""

    TRAIN = "train"
    EXTRACT = "extract"
    POSTPROCESS = "postprocess"
    EVALUATE = "evaluate"
    BASELINE = "baseline"
    TUNE = "tune"
    TUNE_TRIAL = "tune_trial"
    PROMOTE = "promote"
    SETTINGS = "settings"  # the val grid of extraction settings of one model (isc.settings)
    PACKAGE = "package"
    EXPORT = "export"
    MATCH = "match"
    SEARCH = "search"
    MAKE_MINI = "make_mini"
    MAIN = "main"
    IMPORT_SEED = "import_seed"  # isc import-seed --register: a seed checkpoint logged and registered


# ------------------------------------------------------------------ artifact paths inside a run
ARTIFACT_CHECKPOINTS = "checkpoints"  # checkpoint_NNNN.pth.tar: full state after epoch index NNNN
ARTIFACT_FINAL_MODEL = "model/final.pth.tar"  # weights + model_config of a finished training run
ARTIFACT_DESCRIPTORS = "descriptors"
DESCRIPTORS_FILE = "descriptors.h5"  # queries + references, raw
TRAIN_DESCRIPTORS_FILE = "train_descriptors.h5"  # the training images: the NES bank's source
NES_DESCRIPTORS_FILE = "descriptors_nes.h5"  # after negative embedding subtraction
NES_BANK_FILE = "nes_bank.h5"  # the DBA-smoothed bank NES subtracted with
ARTIFACT_EVALUATION = "evaluation"


def run_artifact_uri(run_id: str, *path: str) -> str:
    """``runs:/<run id>/<path>``: how one step names a file another step's run logged (the driver hands
    these on as parameters), e.g. ``run_artifact_uri(rid, ARTIFACT_DESCRIPTORS, DESCRIPTORS_FILE)``."""
    return "/".join([f"runs:/{run_id}", *path])

# ------------------------------------------------------------------ the registered pyfunc's layout
DEFAULT_MODEL_NAME = "isc-descriptor"
CHAMPION = "champion"
PREVIOUS = "previous"
PYFUNC_ARTIFACT_NAME = "descriptor_model"
PYFUNC_CHECKPOINT = "checkpoint.pth.tar"  # <model dir>/artifacts/checkpoint.pth.tar
PYFUNC_BANK = "nes_bank.h5"  # <model dir>/artifacts/nes_bank.h5 (optional)


def model_uri(name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION) -> str:
    """``models:/<name>@<alias>``, the registry URI of the version an alias points at: the one place it is
    spelled (:meth:`ModelRef.parse` reads it back as kind ``alias``)."""
    return f"models:/{name}@{alias}"


def model_version_uri(name: str, version: str | int) -> str:
    """``models:/<name>/<version>``, one registered version (:meth:`ModelRef.parse`: kind ``version``)."""
    return f"models:/{name}/{version}"

# ------------------------------------------------------------------ negative embedding subtraction
# The seed's constants (scripts/postprocess.py): NES k=10, beta=0.35, one iteration; DBA k=10, alpha=3.
NES_K = 10
NES_BETA = 0.35
NES_NUM_ITER = 1
DBA_K = 10
DBA_ALPHA = 3.0

DEFAULT_EXPERIMENT = "isc"
RUN_ID_LEN = 32


def looks_like_run_id(text: str) -> bool:
    """32 lowercase hex digits: what MLflow's run ids look like."""
    return len(text) == RUN_ID_LEN and all(c in "0123456789abcdef" for c in text)


def parse_bool(value: str | bool) -> bool:
    """The one boolean parser (CLI flags, config files, MLproject parameters); empty means false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false, yes/no, 1/0, on/off), got '{value}'")


def experiment_choice(explicit: str | None = None) -> tuple[str, str]:
    """Which experiment a step uses: ``("id", x)`` or ``("name", x)``.

    The one rule: an explicit name (or id) wins; then ``MLFLOW_EXPERIMENT_ID`` (set by ``mlflow run``),
    then ``MLFLOW_EXPERIMENT_NAME``, then ``isc``. Callers look it up (or create it) with
    :func:`isc.tracking.experiment_id`.
    """
    text = (explicit or "").strip()
    if text:
        return "name", text
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return "id", os.environ["MLFLOW_EXPERIMENT_ID"]
    return "name", os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


# ------------------------------------------------------------------ model references
_EPOCH_TAIL = re.compile(r"(?:checkpoint_)?(\d+)(?:\.pth\.tar)?")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference. ``kind`` is one of

    * ``path``: a local file or folder;
    * ``run``: a bare training run id (its final model, or latest checkpoint);
    * ``run_epoch``: ``<run id>:N`` = that run's ``checkpoints/checkpoint_000N.pth.tar`` (the seed's hand-offs);
    * ``runs``: ``runs:/<id>[/<path>]``;
    * ``alias`` / ``version``: ``models:/name@alias`` / ``models:/name/version`` (registry);
    * ``logged_model``: ``models:/m-<id>`` (MLflow 3 logged model);
    * ``uri``: any other artifact URI (``mlflow-artifacts:/``, ``s3://``, ``file://``...).
    """

    text: str
    kind: str
    run_id: str | None = None
    path: str | None = None  # the artifact path inside the run, or the local path
    epoch: int | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, ref: str | Path) -> ModelRef:
        text = str(ref).strip()
        if not text:
            raise ConfigError("model", "empty model reference")
        if Path(text).expanduser().exists():
            return cls(text, "path", path=str(Path(text).expanduser()))
        if text.startswith("models:/"):
            rest = text[len("models:/"):].strip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return cls(text, "alias", name=name, alias=alias)
            if "/" in rest:
                name, version = rest.split("/", 1)
                return cls(text, "version", name=name, version=version)
            return cls(text, "logged_model", name=rest)
        if text.startswith("runs:/"):
            run_id, _, sub = text[len("runs:/"):].strip("/").partition("/")
            return cls(text, "runs", run_id=run_id, path=sub or None)
        run_id, sep, tail = text.partition(":")
        if sep and looks_like_run_id(run_id):
            m = _EPOCH_TAIL.fullmatch(tail.strip())
            if not m:
                raise ConfigError("model", f"{text}: expected <run id>:<epoch index> (e.g. {run_id}:5 = checkpoint_0005)")
            return cls(text, "run_epoch", run_id=run_id, epoch=int(m.group(1)))
        if looks_like_run_id(text):
            return cls(text, "run", run_id=text)
        if "://" in text or text.startswith("mlflow-artifacts:/"):
            return cls(text, "uri")
        raise ConfigError("model", f"{text}: no such file, and not an MLflow run id (<id>, <id>:N) or artifact "
                                  "URI (runs:/, models:/, ...)")

    @property
    def is_registry(self) -> bool:
        return self.kind in ("alias", "version")


def stored_model_ref(ref: str | Path | None) -> str:
    """``ref`` as a run records it: a local path made absolute (``isc promote`` or ``extract --model
    <evaluation>`` may run from another folder), anything else (run ids, ``runs:/``, ``models:/``) as given."""
    text = str(ref or "").strip()
    local = Path(text).expanduser()
    return os.path.abspath(local) if text and local.exists() else text


# ------------------------------------------------------------------ the evaluation record
@dataclass
class Evaluation:
    """One evaluation run as promotion sees it: what :func:`to_tags` writes, :func:`from_run` reads."""

    average_precision: float | None
    gt_fingerprint: str
    gt_path: str
    protocol: str = "official"
    recall_p90: float | None = None
    model_ref: str = ""
    nes_bank: str | None = None
    nes_params: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    git_commit: str | None = None
    # the extraction settings the scored descriptors were made with (isc.settings): what the version serves with
    input_size: int | None = None
    tta: bool | None = None

    def to_tags(self) -> dict[str, str]:
        """The evaluation run's tags (metrics are logged as metrics, not here)."""
        tags = {Tag.STEP: Step.EVALUATE, Tag.GT_FINGERPRINT: self.gt_fingerprint, Tag.GT_PATH: self.gt_path,
                Tag.PROTOCOL: self.protocol}
        if self.model_ref:
            tags[Tag.MODEL_REF] = str(self.model_ref)
        if self.nes_bank:
            tags[Tag.NES_BANK] = str(self.nes_bank)
        if self.nes_params:
            tags[Tag.NES_PARAMS] = json.dumps(self.nes_params, sort_keys=True)
        if self.input_size:
            tags[Tag.INPUT_SIZE] = str(int(self.input_size))
            tags[Tag.TTA] = str(bool(self.tta)).lower()
        return tags

    @classmethod
    def from_run(cls, run: Any) -> Evaluation:
        """Read an MLflow evaluation run back (``average_precision`` / ``recall_p90`` metrics + tags)."""
        tags, metrics = run.data.tags, run.data.metrics
        nes_params: dict[str, Any] = {}
        if tags.get(Tag.NES_PARAMS):
            try:
                nes_params = dict(json.loads(tags[Tag.NES_PARAMS]))
            except (ValueError, TypeError):
                log.warning("run %s: unreadable %s tag %r (seed defaults used)", run.info.run_id, Tag.NES_PARAMS,
                            tags[Tag.NES_PARAMS])
        ap = metrics.get("average_precision")
        recall = metrics.get("recall_p90")
        size = tags.get(Tag.INPUT_SIZE, "")
        return cls(
            average_precision=float(ap) if ap is not None else None,
            recall_p90=float(recall) if recall is not None else None,
            gt_fingerprint=tags.get(Tag.GT_FINGERPRINT, ""),
            gt_path=tags.get(Tag.GT_PATH, ""),
            protocol=tags.get(Tag.PROTOCOL, "official"),
            model_ref=tags.get(Tag.MODEL_REF, ""),
            nes_bank=tags.get(Tag.NES_BANK) or None,
            nes_params=nes_params,
            run_id=run.info.run_id,
            git_commit=tags.get("mlflow.source.git.commit") or None,
            input_size=int(size) if size.isdigit() else None,
            tta=parse_bool(tags[Tag.TTA]) if size.isdigit() and tags.get(Tag.TTA) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
