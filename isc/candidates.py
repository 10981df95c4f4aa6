"""The models the main job offers to promotion, each a :class:`Candidate` with its summary row: a stage's
model evaluated (extract -> postprocess -> evaluate on test, and on val, which chooses), the val grid of
extraction settings for the best of them, and the tuned model (the best trial of a study, retrained or not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from isc.contract import (
    ARTIFACT_DESCRIPTORS,
    BASELINE_TRIAL_PARAM,
    BEST_TRIAL_RUN_TAG,
    DESCRIPTORS_FILE,
    NES_BANK_FILE,
    NES_DESCRIPTORS_FILE,
    TRAIN_DESCRIPTORS_FILE,
    Tag,
    run_artifact_uri,
)
from isc.metrics import summary_columns
from isc.pipeline import MainJob
from isc.recipe import PROFILES, SettingsPlan, Stage, start_label, start_reference, tuned_stage
from isc.tune import load_tune_config


@dataclass
class Candidate:
    """One model the main job offers to promotion: its summary row and what the settings phase needs."""

    name: str  # the stage's name (step names: extract_<name>, ...)
    train_run: str
    row: dict[str, Any]
    val_uap: float | None  # after NES, at the training size: ranks the candidates for the grid
    served: Any  # ExtractionSettings its scored descriptors were extracted with


def evaluate_stage(job: MainJob, stage: Stage, train_run: str, label: str | None = None,
                   settings: Any = None) -> Candidate:
    """extract -> postprocess -> evaluate (test; and val, which chooses the champion) of one stage, at its
    training size without TTA, or at ``settings`` (ExtractionSettings: the steps' names end in its key)."""
    from isc.settings import ExtractionSettings

    pipe, data_dir, out_root, test_gt, select_gt = job.pipe, job.data_dir, job.out_root, job.test_gt, job.select_gt
    suffix = f"_{settings.key()}" if settings else ""
    name = f"{stage.name}{suffix}"
    ext = pipe.run(
        f"extract_{name}", "extract",
        # The folder is this step's own (one per training run and setting): a re-run may replace its files.
        {"model": train_run, "data": str(data_dir), "sets": "qrt", "overwrite": "true",
         "output_dir": str(out_root / "extract" / (train_run + suffix)),
         "input_size": settings.input_size if settings else 0, "tta": str(bool(settings and settings.tta)).lower()},
    )
    ext_params = pipe.client.get_run(ext.run_id).data.params
    served = ExtractionSettings(int(ext_params["resolved_input_size"]), ext_params["resolved_tta"] == "true")
    raw = run_artifact_uri(ext.run_id, ARTIFACT_DESCRIPTORS, DESCRIPTORS_FILE)
    post = pipe.run(
        f"postprocess_{name}", "postprocess",
        {"descriptors": raw, "train_descriptors": run_artifact_uri(ext.run_id, ARTIFACT_DESCRIPTORS, TRAIN_DESCRIPTORS_FILE),
         "output": str(out_root / "postprocess" / ext.run_id / NES_DESCRIPTORS_FILE), "overwrite": "true"},
    )  # the folder is this step's own (one per extraction run): a retry after a crash may replace it
    nes = {"descriptors": run_artifact_uri(post.run_id, ARTIFACT_DESCRIPTORS, NES_DESCRIPTORS_FILE), "before": raw,
           "model_ref": train_run, "nes_bank": run_artifact_uri(post.run_id, ARTIFACT_DESCRIPTORS, NES_BANK_FILE)}
    ev = pipe.run(f"evaluate_{name}", "evaluate", {**nes, "ground_truth": str(test_gt), "data": str(data_dir)})
    row = {
        "step": label or f"{stage.name} ({Path(stage.config).stem}{', no fine-tuning' if dict(stage.overrides).get('epochs') == 0 else ''})",
        "starts from": start_label(stage),
        "settings": served.label,
        **summary_columns(ev.metrics, before=True),
        **summary_columns(ev.metrics, interval=interval_text(ev.metrics)),
    }
    val = None
    if select_gt != test_gt:
        sel = pipe.run(f"evaluate_val_{name}", "evaluate", {**nes, "ground_truth": str(select_gt)})
        val = sel.metrics.get("average_precision")
        row["val uAP (selects)"] = val
    return Candidate(stage.name, train_run, row, val, served)


def settings_phase(job: MainJob, candidates: list[Candidate], grid: SettingsPlan) -> str:
    """The val grid for the ``grid.top`` candidates with the best val µAP at their training size (0 = all):
    a ``settings`` step each; a candidate whose val-best setting is not the one it was scored at is extracted,
    post-processed and evaluated again at it, and its summary row shows those numbers (its training-size
    evaluation stays in the experiment: promotion takes the best val µAP over every evaluation, so the
    champion is the best (candidate, setting) seen on val and serves with that setting). Returns the
    summary's line about it."""
    from isc.settings import ExtractionSettings

    pipe, data_dir, select_gt = job.pipe, job.data_dir, job.select_gt
    ranked = sorted([c for c in candidates if c.val_uap is not None], key=lambda c: -c.val_uap)
    chosen = ranked[: grid.top] if grid.top else ranked
    for cand in candidates:
        if cand not in chosen:
            cand.row["settings"] += " (not in the grid's top)"
    for cand in chosen:
        sel = pipe.run(f"settings_{cand.name}", "settings", {
            "model": cand.train_run, "data": str(data_dir), "ground_truth": str(select_gt), "sizes": grid.sizes,
            "tta": grid.tta, "tta_sizes": grid.tta_sizes})
        params = pipe.client.get_run(sel.run_id).data.params
        best = ExtractionSettings(int(params["chosen_input_size"]), params["chosen_tta"] == "true")
        if best == cand.served:
            cand.row["settings"] += " (val grid's best)"
            continue
        stage = Stage(cand.name, "")
        again = evaluate_stage(job, stage, cand.train_run, settings=best)
        training = {"uAP at training size": cand.row["uAP"], "val uAP at training size": cand.val_uap}
        cand.row.update({k: v for k, v in again.row.items() if k not in ("step", "starts from")})
        cand.row["settings"] += " (val grid's best)"
        cand.row.update(training)
        cand.val_uap, cand.served = again.val_uap, best
    names = ", ".join(c.name for c in chosen)
    return (f"settings: val grid (sizes {grid.sizes}, TTA {grid.tta}; TTA tried at the best "
            f"{grid.tta_sizes or 'every'} size(s)) for the top {grid.top or 'all'} candidate(s) by val µAP at "
            f"their training size: {names}")


def tuned_candidate(job: MainJob, stage_runs: dict[str, str], n_trials: int) -> tuple[Candidate | None, str]:
    """Tune the profile's tuned stage from its hand-off checkpoint; evaluate the tuned model like a stage.

    Returns the candidate (None when no trial completed) and a line about the study. The tuned model is
    the best trial's values retrained for the stage's full epochs, or the trial's own model (the tune
    config's ``candidate``); it is tagged with the study, trial and values, which promotion copies.
    """
    import mlflow


    pipe, profile, data_dir, extra, force = job.pipe, job.profile, job.data_dir, job.extra, job.force
    tune_config = PROFILES[profile].tune_config
    cfg = load_tune_config(Path(pipe.project_dir) / tune_config, profile=profile)
    stage = tuned_stage(profile, cfg.stage)
    start = start_reference(stage, stage_runs)
    active = mlflow.active_run()
    # One study per (experiment, stage, starting model): a plain re-run reuses it, a new hand-off checkpoint
    # is a new problem; --force starts a fresh study (n_trials is a study-wide target).
    study = "-".join(["isc-tune", active.info.experiment_id, stage.name, *([start[:8]] if start else []),
                      *([active.info.run_id[:8]] if force else [])])
    tune = pipe.run("tune", "tune", {
        "config": tune_config, "data": str(data_dir), "n_trials": n_trials, "study_name": study, "profile": profile,
        "stage": stage.name, "start_from": start, "overrides": json.dumps(extra, sort_keys=True) if extra else ""})
    m = tune.metrics
    counts = (f"{int(m.get('n_complete', 0))} complete, {int(m.get('n_pruned', 0))} pruned, "
              f"{int(m.get('n_failed', 0))} failed")
    best_run = pipe.client.get_run(tune.run_id).data.tags.get(BEST_TRIAL_RUN_TAG)
    if not best_run:
        return None, f"tune: study {study} ({counts}): no complete trial, so no tuned candidate"
    best_trial = pipe.client.get_run(best_run)
    best, own_values = best_trial.data.tags, best_trial.data.params.get(BASELINE_TRIAL_PARAM) == "True"
    params = json.loads(best[Tag.TUNE_PARAMS])
    provenance = {Tag.TUNE_STUDY: study, Tag.TUNE_TRIAL: best[Tag.TUNE_TRIAL], Tag.TUNE_PARAMS: best[Tag.TUNE_PARAMS],
                  Tag.TUNE_STUDY_RUN: tune.run_id, Tag.TUNE_STAGE: stage.name, Tag.TUNE_CANDIDATE: cfg.candidate}
    model_run = best_run
    if cfg.candidate == "retrain":
        start_kind = {"init_from": start if stage.start == "init" else "", "resume_from": ""}
        train = pipe.run(f"train_{stage.name}_tuned", "train", {
            "config": stage.config, "data": str(data_dir), **start_kind,
            "overrides": json.dumps({**extra, **dict(stage.overrides), **params}, sort_keys=True)})
        model_run = train.run_id
    for key, value in provenance.items():
        pipe.client.set_tag(model_run, key, value)
    label = f"{stage.name} tuned (trial {best[Tag.TUNE_TRIAL]}{', retrained' if cfg.candidate == 'retrain' else ''})"
    cand = evaluate_stage(job, replace(stage, name=f"{stage.name}_tuned"), model_run, label=label)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    source = "retrained with them for the stage's full epochs" if cfg.candidate == "retrain" else "its own model"
    own = " (the stage's own values)" if own_values else ""
    return cand, (f"tune: study {study}, {stage.name} from {start or 'pretrained'}: {counts}; best trial "
                 f"{best[Tag.TUNE_TRIAL]}{own} val µAP "
                 f"{m.get('best_value', float('nan')):.4f} (after NES, {cfg.epochs_per_trial}-epoch trial) with "
                 f"{shown}; tuned row = {source}")


def interval_text(metrics: dict[str, float]) -> str | None:
    """The evaluate step's query-bootstrap µAP interval as text (None when it logged none)."""
    lo, hi = metrics.get("average_precision_ci_low"), metrics.get("average_precision_ci_high")
    return None if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"
