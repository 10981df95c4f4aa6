"""Evaluate a descriptor file and record it: what ``isc evaluate``, ``isc baseline`` and the main job run.

:func:`run_evaluation` scores descriptors under one protocol (:func:`isc.metrics.evaluate`), adds the
query-bootstrap interval of µAP, writes the ``evaluation/`` files (metrics.json, pr_curve.png, gallery.png)
and, inside an active MLflow run, logs params, metrics, the :class:`~isc.contract.Evaluation` tags and
those files. Inputs are paths, run ids or artifact URIs (:func:`load_descriptors`,
:func:`load_ground_truth`) or objects already in memory; :func:`prepare_inputs` loads and cross-checks
them, so an entry point can fail on a bad file before it opens a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isc import lineage, tracking
from isc.contract import (
    ARTIFACT_DESCRIPTORS,
    ARTIFACT_EVALUATION,
    DESCRIPTORS_FILE,
    NES_DESCRIPTORS_FILE,
    Evaluation,
    stored_model_ref,
)
from isc.errors import DescriptorFileError
from isc.fileutil import atomic_path, check_outputs
from isc.io import Descriptors, GroundTruth, read_descriptors, read_ground_truth
from isc.knn import DEFAULT_BATCH_SIZE
from isc.limits import check_bootstrap
from isc.metrics import (
    EvalResult,
    Metrics,
    bootstrap_average_precision,
    check_ground_truth_ids,
    check_not_constant,
    evaluate,
    ground_truth_fingerprint,
)

# What an evaluation logs: every field of Metrics (a metric added there is logged with no second list to
# keep), plus what evaluation itself adds (the query count, the bootstrap interval).
METRIC_KEYS = (*(f.name for f in dataclasses.fields(Metrics)), "n_queries", "average_precision_ci_low",
               "average_precision_ci_high")
DEFAULT_BOOTSTRAP = 1000


def _local_file(ref: str | Path, default_subpath: str, names: tuple[str, ...]) -> Path:
    """Resolve a path / run id / artifact URI to a local file (a folder must hold one of ``names``)."""
    try:
        path = tracking.resolve_artifact(ref, default_subpath=default_subpath)
    except FileNotFoundError as exc:
        raise DescriptorFileError(ref, str(exc).removeprefix(f"{ref}: ")) from exc
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        h5 = sorted(path.glob("*.h5")) if names[0].endswith(".h5") else []
        if len(h5) == 1:
            return h5[0]
        raise DescriptorFileError(ref, f"is a folder without {' or '.join(names)}")
    return path


def descriptor_path(ref: str | Path) -> Path:
    """The local descriptor h5 of a path, a run id (its ``descriptors/``, NES output first) or an artifact URI."""
    return _local_file(ref, ARTIFACT_DESCRIPTORS, (NES_DESCRIPTORS_FILE, DESCRIPTORS_FILE))


def load_descriptors(ref: str | Path, allow_large_dim: bool = False) -> Descriptors:
    """Read a descriptor h5 given as a path, a run id (its ``descriptors/``) or an artifact URI."""
    return read_descriptors(descriptor_path(ref), allow_large_dim=allow_large_dim)


def load_ground_truth(ref: str | Path) -> tuple[GroundTruth, Path]:
    """A ground-truth CSV given as a path, a run id (its ``ground_truth.csv``) or an artifact URI.

    A folder is refused by :func:`read_ground_truth`, naming the split files it holds: scoring on a
    folder's ``ground_truth.csv`` would silently mix every split, training pairs included.
    """
    try:
        path = tracking.resolve_artifact(ref, default_subpath="ground_truth.csv")
    except FileNotFoundError as exc:
        raise DescriptorFileError(ref, str(exc).removeprefix(f"{ref}: ")) from exc
    return read_ground_truth(path), path


@dataclass
class EvaluationInputs:
    """What :func:`prepare_inputs` loaded: descriptors, ground truth (and its path), raw descriptors."""

    desc: Descriptors
    gt: GroundTruth
    gt_path: str
    before: Descriptors | None


def _check_set(desc: Descriptors, gt: GroundTruth, source: str) -> None:
    """GT ids present, and not all one vector (all zero, say): both fail before a run opens."""
    check_ground_truth_ids(desc, gt, source)
    check_not_constant(source, "query", np.asarray(desc.query))
    check_not_constant(source, "reference", np.asarray(desc.reference))


def prepare_inputs(
    descriptors: str | Path | Descriptors,
    ground_truth: str | Path | GroundTruth,
    before: str | Path | Descriptors | None,
    allow_large_dim: bool,
    data: str | Path | None,
) -> EvaluationInputs:
    """Load and cross-check every input (an entry point calls it before any MLflow run is opened)."""
    if isinstance(ground_truth, GroundTruth):
        gt, gt_path = ground_truth, ""
    else:
        gt, p = load_ground_truth(ground_truth)
        gt_path = str(p)
    desc = (
        descriptors
        if isinstance(descriptors, Descriptors)
        else load_descriptors(descriptors, allow_large_dim)
    )
    _check_set(desc, gt, str(descriptors) if not isinstance(descriptors, Descriptors) else "descriptors")
    bef = None
    if before is not None:
        bef = before if isinstance(before, Descriptors) else load_descriptors(before, allow_large_dim)
        _check_set(bef, gt, str(before) if not isinstance(before, Descriptors) else "before")
    if data is not None:
        from isc.data.disc21 import DISC21

        DISC21(Path(data)).validate("qr")
    return EvaluationInputs(desc, gt, gt_path, bef)


def _flat(d: dict[str, Any]) -> dict[str, float]:
    return {k: d[k] for k in METRIC_KEYS if d.get(k) is not None}


def _add_intervals(out: dict[str, Any], result: EvalResult, before: EvalResult | None, gt: GroundTruth,
                   n_boot: int) -> None:
    """Put the query-bootstrap intervals into ``out`` (see :func:`bootstrap_average_precision`)."""
    rankings = [result.ranked] + ([before.ranked] if before is not None else [])
    boot = bootstrap_average_precision(rankings, gt, n_boot=n_boot)
    out["average_precision_ci_low"], out["average_precision_ci_high"] = boot.interval(0)
    out["bootstrap"] = {"replicates": n_boot, "confidence": boot.confidence, "queries": len(boot.queries)}
    if before is not None:
        out["before"]["average_precision_ci_low"], out["before"]["average_precision_ci_high"] = boot.interval(1)
        out["gain_ci_low"], out["gain_ci_high"], out["p_gain"] = boot.difference(0, 1)


def run_evaluation(
    descriptors: str | Path | Descriptors,
    ground_truth: str | Path | GroundTruth,
    before: str | Path | Descriptors | None = None,
    protocol: str = "official",
    max_results: int = 500_000,
    knn: int = 10,
    metric: str = "l2",
    data: str | Path | None = None,
    model_ref: str | None = None,
    nes_bank: str | None = None,
    allow_large_dim: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    output_dir: str | Path | None = None,
    gt_path: str | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    settings: Any = None,
) -> dict[str, Any]:
    """Evaluate ``descriptors`` and log everything into the active MLflow run (if any).

    Returns the JSON-ready result: the metrics of :meth:`EvalResult.to_dict`, ``gt_fingerprint``, and
    ``before`` (the same metrics for ``before``) when given. ``gt_path`` names the GT in the tags when
    ``ground_truth`` is an in-memory :class:`GroundTruth`. ``bootstrap`` > 0 adds the 95 % query-bootstrap
    interval of µAP (``average_precision_ci_low/high``; with ``before``, also ``gain_ci_low/high`` and
    ``p_gain``, the paired share of replicates where the descriptors beat ``before``). ``settings``: the
    :class:`~isc.settings.ExtractionSettings` of the descriptors (default: read from the files' attributes).
    """
    import mlflow

    inputs = prepare_inputs(descriptors, ground_truth, before, allow_large_dim, data)
    kwargs = dict(protocol=protocol, max_results=max_results, knn=knn, metric=metric, batch_size=batch_size)
    kwargs["allow_large_dim"] = allow_large_dim
    result = evaluate(inputs.desc, inputs.gt, **kwargs)
    before_result = evaluate(inputs.before, inputs.gt, **kwargs) if inputs.before is not None else None
    out: dict[str, Any] = result.to_dict()
    out["gt_fingerprint"] = ground_truth_fingerprint(inputs.gt)
    if before_result is not None:
        out["before"] = before_result.to_dict()
    if bootstrap > 0:
        check_bootstrap(bootstrap)
        _add_intervals(out, result, before_result, inputs.gt, bootstrap)

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="isc-eval-")))
        else:
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
        files = _write_artifacts(folder, out, result, before_result, data)
        if mlflow.active_run() is not None:
            settings = settings or extraction_settings(descriptors, before)
            record = Evaluation(average_precision=out.get("average_precision"), gt_fingerprint=out["gt_fingerprint"],
                                gt_path=gt_path or inputs.gt_path, protocol=protocol, model_ref=stored_model_ref(model_ref),
                                nes_bank=str(nes_bank) if nes_bank else None,
                                nes_params=lineage.nes_params_of(str(nes_bank)) if nes_bank else {},
                                input_size=settings.input_size if settings else None,
                                tta=settings.tta if settings else None)
            params = _params(protocol, metric, max_results, knn, descriptors=descriptors, before=before)
            if settings:  # what the scored model was extracted with: what a version registered from it serves with
                tracking.log_params({"input_size": settings.input_size, "tta": str(settings.tta).lower()},
                                    prefix="extract.")
            _log_to_run(out, files, record, params)
    return out


def extraction_settings(*sources: Any) -> Any:
    """The extraction settings recorded in the first descriptor file of ``sources`` that has them (the raw
    ``before`` file: NES output files do not carry them); None for in-memory descriptors or older files."""
    from isc.settings import settings_of_file

    for ref in reversed(sources):  # before first
        if ref is None or isinstance(ref, Descriptors):
            continue
        try:
            found = settings_of_file(descriptor_path(ref))
        except DescriptorFileError:
            continue
        if found:
            return found
    return None


def _params(protocol: str, metric: str, max_results: int, knn: int, **sources: Any) -> dict[str, Any]:
    """The ``eval.*`` params: protocol, metric, the protocol's cap and the inputs given as references."""
    params: dict[str, Any] = {"protocol": protocol, "metric": metric}
    if protocol == "max_results":
        params["max_results"] = max_results
    if protocol == "knn":
        params["knn"] = knn
    for name, value in sources.items():
        if value is not None and not isinstance(value, Descriptors):
            params[name] = str(value)
    return params


def _log_to_run(out: dict[str, Any], files: list[Path], record: Evaluation, params: dict[str, Any]) -> None:
    """Tags, ``eval.*`` params, metrics (``before_*`` and the paired gain too) and files into the active run."""
    import mlflow

    mlflow.set_tags(record.to_tags())
    tracking.log_params(params, prefix="eval.")
    model_id, gt_dataset = _lineage(record)
    metrics = _flat(out)
    if "before" in out:
        metrics.update({f"before_{k}": v for k, v in _flat(out["before"]).items()})
        metrics.update({k: out[k] for k in ("gain_ci_low", "gain_ci_high", "p_gain") if k in out})
    # µAP and R@P90 also land on the model that was scored, per ground truth (MLflow's Models tab)
    headline = {k: metrics.pop(k) for k in ("average_precision", "recall_p90") if k in metrics}
    tracking.log_metrics(headline, model_id=model_id, dataset=gt_dataset)
    tracking.log_metrics(metrics)
    for f in files:
        tracking.log_artifact(f, artifact_path=ARTIFACT_EVALUATION)


def _lineage(record: Evaluation) -> tuple[str | None, Any]:
    """Log the ground truth as the run's dataset and the scored model's training knobs as ``train.*``
    params; ``(the training run's LoggedModel id, the GT dataset)`` to link the metrics to."""
    gt_dataset = None
    if record.gt_path and Path(record.gt_path).is_file():
        gt_dataset = lineage.ground_truth_dataset(record.gt_path, lineage.split_of(record.gt_path))
        lineage.log_datasets([(gt_dataset, "evaluation")])
    model_id = None
    run_id = lineage.training_run_of(record.model_ref) if record.model_ref else None
    if run_id:  # resolved once: a registry reference costs a lookup
        tracking.log_params(lineage.run_params(run_id))
        model_id = lineage.training_model_id(run_id)
    return model_id, gt_dataset


ARTIFACT_FILES = ("metrics.json", "pr_curve.png", "gallery.png")


def check_output_dir(output_dir: str | Path | None, inputs: dict[str, Any], overwrite: bool,
                     param: str = "output_dir") -> None:
    """The output rule (:func:`isc.fileutil.check_outputs`) for the files :func:`run_evaluation` keeps in
    ``output_dir``: an earlier evaluation's metrics.json/pr_curve.png are replaced only with ``overwrite``.
    ``inputs`` values that are not local paths (run ids, URIs, loaded objects) are skipped."""
    if not output_dir:
        return

    local = {k: v for k, v in inputs.items() if isinstance(v, str | Path) and "://" not in str(v)}
    check_outputs({n: Path(output_dir) / n for n in ARTIFACT_FILES}, local, overwrite, param=param)


def _write_artifacts(
    folder: Path,
    out: dict[str, Any],
    result: EvalResult,
    before_result: EvalResult | None,
    data: str | Path | None,
) -> list[Path]:
    """metrics.json, pr_curve.png and (with ``data``) gallery.png in ``folder``; returns their paths."""
    from isc.plots import gallery_png, pr_curve_png

    files = []
    metrics_json = folder / "metrics.json"
    with atomic_path(metrics_json) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    files.append(metrics_json)
    curves = [("after", result), ("before", before_result)] if before_result is not None else result
    title = f"ISC21 {result.protocol} ({result.metric}), {result.n_queries} queries"
    files.append(pr_curve_png(curves, folder / "pr_curve.png", title=title))
    if data is not None:
        from isc.data.disc21 import DISC21

        root = DISC21(Path(data))
        files.append(gallery_png(result, root.query_dir, root.reference_dir, folder / "gallery.png"))
    return files
