"""MLflow lineage a user can click: the experiment's kind, the datasets each run reads, the model each
training run produced, and the training parameters behind each evaluation.

* The experiment is tagged ``mlflow.experimentKind=custom_model_development``: MLflow 3's UI otherwise
  opens a new experiment on its GenAI overview (traces, tokens) instead of the runs table.
* Datasets are logged with ``mlflow.log_input`` as metadata only (nothing is copied): an image folder
  as its file count and a digest of its file list (names and sizes), a ground-truth CSV as its rows
  and split. The runs table's Dataset column then says which data (and which version of it) a run read.
* Every finished training run gets an *external* LoggedModel (MLflow 3) that points at its
  ``model/final.pth.tar``: the runs table's Model column is filled without copying the weights, and
  evaluation metrics are linked to it (``log_metrics(model_id=..., dataset=...)``).
* Evaluation runs log the parameters of the training run behind their model as ``train.<name>``
  params, so the compare / parallel-coordinates view relates µAP to margins, memory size, lr...

Lineage is a convenience: a failure here is a warning, never a failed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from isc.contract import ARTIFACT_FINAL_MODEL, ModelRef, Tag

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MODEL_TYPE = "isc-descriptor-checkpoint"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# The training parameters an evaluation is compared on (the knobs of the recipe); all of them when present.
UPSTREAM_KEYS = ("stage", "backbone", "pretrained", "input_size", "dim", "pos_margin", "neg_margin", "memory_size",
                 "lr", "schedule", "warmup_steps", "epochs", "batch_size", "views", "anchor", "loss", "freeze_blocks",
                 "freeze_bn", "wd", "init_from", "resume_from")
UPSTREAM_PREFIX = "train."


def set_experiment_kind(experiment_id: str) -> None:
    """Mark the experiment as model development (the UI opens on its runs), unless a kind is set."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        exp = client.get_experiment(experiment_id)
        if exp is not None and EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as exc:  # noqa: BLE001 -- e.g. a server that refuses experiment tags
        log.warning("could not set %s on experiment %s: %s", EXPERIMENT_KIND_TAG, experiment_id, exc)


def folder_digest(folder: Path, files: Iterable[Path]) -> str:
    """Digest of a file list: relative names and sizes (reading every image would cost minutes on DISC21)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _dataset_classes() -> tuple[Any, Any]:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class _Dataset(MetaDataset):
        """Metadata-only dataset with a profile (the UI shows it next to name and digest)."""

        def __init__(self, source: Any, name: str, digest: str, profile: Mapping[str, Any]):
            self._profile = dict(profile)
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> Any:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            out = super().to_dict()
            out["profile"] = json.dumps(self._profile)
            return out

    def source(path: str) -> Any:
        with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(path)  # a local path -> MLflow's "local" file-system source

    return _Dataset, source


def image_folder_dataset(folder: str | Path, name: str | None = None) -> Any:
    """An image folder as an MLflow dataset: ``{"images": n}`` and a digest of its file list."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    cls, source = _dataset_classes()
    return cls(source(str(folder)), name or f"{folder.parent.name}/{folder.name}", folder_digest(folder, files),
               {"images": len(files)})


def ground_truth_dataset(path: str | Path, split: str | None = None) -> Any:
    """A ground-truth CSV as an MLflow dataset: rows, positive pairs, split; digest of its bytes."""
    path = Path(path).resolve()
    data = path.read_bytes()
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines()[1:] if ln.strip()]
    positives = sum(1 for ln in lines if ln.split(",")[1:2] and ln.split(",")[1].strip())
    cls, source = _dataset_classes()
    profile = {"queries": len(lines), "positive_pairs": positives, "split": split or "all"}
    return cls(source(str(path)), f"{path.parent.name}/{path.name}", hashlib.sha256(data).hexdigest()[:16], profile)


def split_of(path: str | Path) -> str | None:
    """``ground_truth_val.csv`` -> ``val``; ``ground_truth.csv`` -> None."""
    stem = Path(path).stem
    return stem.split("ground_truth_", 1)[1] if stem.startswith("ground_truth_") else None


def log_datasets(items: Iterable[tuple[Any, str]]) -> None:
    """``mlflow.log_inputs`` for ``(dataset, context)`` pairs in the active run (warn on failure)."""
    import mlflow

    items = list(items)
    if not items or mlflow.active_run() is None:
        return
    try:
        mlflow.log_inputs(datasets=[d for d, _ in items], contexts=[c for _, c in items], tags_list=[{} for _ in items])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not log input datasets: %s", exc)


DISC21_CONTEXTS = {"q": "query", "r": "reference", "t": "training"}


def log_disc21_inputs(data_dir: str | Path, sets: str) -> None:
    """Log the DISC21 folders of ``sets`` (letters q, r, t) that exist under ``data_dir``."""
    from isc.data.disc21 import DISC21

    try:
        root = DISC21(Path(data_dir))
        items = [(image_folder_dataset(root.split_dir(c)), DISC21_CONTEXTS[c]) for c in sets
                 if root.split_dir(c).is_dir()]
    except Exception as exc:  # noqa: BLE001
        log.warning("could not describe the datasets under %s: %s", data_dir, exc)
        return
    log_datasets(items)


def training_run_of(model_ref: str) -> str | None:
    """The training run behind a model reference (registry versions: through their model_ref tag)."""
    try:
        ref = ModelRef.parse(model_ref)
    except Exception:  # noqa: BLE001 -- a local file: no run to point at
        return None
    if ref.run_id:
        return ref.run_id
    if ref.is_registry:
        from mlflow import MlflowClient

        client = MlflowClient()
        try:
            mv = (client.get_model_version_by_alias(ref.name, ref.alias) if ref.kind == "alias"
                  else client.get_model_version(ref.name, ref.version))
        except Exception:  # noqa: BLE001 -- no such model / alias: nothing upstream to show
            return None
        inner = mv.tags.get(Tag.MODEL_REF)
        return training_run_of(inner) if inner and inner != model_ref else None
    return None


def upstream_params(model_ref: str) -> dict[str, str]:
    """``train.<key>`` params of the training run behind ``model_ref`` (empty when there is none)."""
    try:
        run_id = training_run_of(model_ref)
    except Exception as exc:  # noqa: BLE001
        log.warning("no upstream training parameters for %s: %s", model_ref, exc)
        return {}
    return run_params(run_id) if run_id else {}


def run_params(run_id: str) -> dict[str, str]:
    """``train.<key>`` params of training run ``run_id`` (with ``train.run_id``); empty when unreadable."""
    from mlflow import MlflowClient

    try:
        params = MlflowClient().get_run(run_id).data.params
    except Exception as exc:  # noqa: BLE001
        log.warning("no upstream training parameters for run %s: %s", run_id, exc)
        return {}
    out = {f"{UPSTREAM_PREFIX}{k}": params[k] for k in UPSTREAM_KEYS if k in params}
    if out:
        out[f"{UPSTREAM_PREFIX}run_id"] = run_id
    return out


def nes_params_of(nes_bank: str) -> dict[str, Any]:
    """The NES constants the postprocess run behind ``runs:/<id>/.../nes_bank.h5`` used (its ``k``,
    ``beta``, ``num_iter`` params), so promotion packages the version with what it was scored with."""
    from mlflow import MlflowClient

    try:
        ref = ModelRef.parse(nes_bank)
        if ref.kind != "runs" or not ref.run_id:
            return {}
        params = MlflowClient().get_run(ref.run_id).data.params
        out = {"k": int(params["k"]), "beta": float(params["beta"]), "num_iter": int(params["num_iter"])}
    except Exception:  # noqa: BLE001 -- a local bank file, or a run that is not a postprocess run
        return {}
    return out


def register_training_model(run_id: str, name: str, params: Mapping[str, Any]) -> str | None:
    """An external LoggedModel for a finished training run's ``model/final.pth.tar``; its id.

    Its metrics are the evaluations of it (:func:`link_metrics`), not the training losses again: logging
    to a model also logs to a run, which would duplicate the run's epoch history."""
    import mlflow

    try:
        model = mlflow.create_external_model(
            name=name, source_run_id=run_id, model_type=MODEL_TYPE,
            params={k: str(params[k]) for k in UPSTREAM_KEYS if k in params},
            tags={Tag.MODEL_REF: run_id, Tag.CHECKPOINT_URI: f"runs:/{run_id}/{ARTIFACT_FINAL_MODEL}"},
        )
        return model.model_id
    except Exception as exc:  # noqa: BLE001
        log.warning("could not create the logged model of run %s: %s", run_id, exc)
        return None


def training_model_id(run_id: str) -> str | None:
    """The LoggedModel :func:`register_training_model` created for ``run_id`` (None when absent)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
        )
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot look up the logged model of run %s: %s", run_id, exc)
        return None
    ours = [m for m in models if m.model_type == MODEL_TYPE]
    return ours[0].model_id if ours else None
