"""Promotion with registry aliases: register the best evaluated model and move ``@champion`` if it wins.

Why aliases: registry *stages* are deprecated in MLflow 3; an alias points at exactly one version and
moving it is the promotion. Aliases keep no history, so every promotion/rollback is also recorded as a
registered-model tag ``isc.promotion.<time>-<id>`` (JSON) and as tags on the versions involved.

The flow of :func:`promote`:

1. :func:`find_best_evaluation`: the FINISHED ``isc evaluate`` runs (tag ``isc.step=evaluate``) of an
   experiment that were scored on one ground truth (tag ``isc.gt_fingerprint``; a ``--ground-truth``
   file selects it, otherwise the runs must agree), that name the model they scored (``isc.model_ref``),
   ranked by ``average_precision`` (µAP).
2. The best run is registered once: a version tagged ``isc.source_eval_run=<run>`` already existing is
   reused, so running promotion twice creates no duplicate version. Concurrent promoters are guarded
   twice: a file lock serialises them on one machine, and after registering each looks again -- when
   several versions of one evaluation exist, the lowest wins and the others delete their own
   (``tags`` are stored with the version in one transaction, so every racer sees every version).
3. :func:`decide` (pure) says whether ``@champion`` moves to it: only if its µAP beats the champion's by
   more than ``min_improvement`` (and both were scored on the same ground truth); the old champion becomes
   ``@previous``. :func:`apply` carries the decision out through :class:`registry.writes.RegistryWriter`,
   the one writer of aliases, tags and descriptions that stays correct when another promoter writes the
   same rows at the same moment. Steps 2-3 run under the machine-wide lock, so promoters on one machine
   see each other's result; promoters on several machines are kept correct by the writer.

:func:`rollback` moves ``@champion`` back to ``@previous`` and marks the demoted version
``isc.rolled_back=true`` so a later promotion does not silently re-promote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from isc.contract import CHAMPION, DEFAULT_MODEL_NAME, PREVIOUS, Evaluation, Step, Tag
from isc.errors import ConfigError, ISCError
from registry.model_logging import log_descriptor_model
from registry.writes import RegistryWriter

log = logging.getLogger(__name__)

# One FINISHED evaluation run that can be registered: the run contract's record.
Candidate = Evaluation


@dataclass
class PromotionResult:
    """What :func:`promote` / :func:`rollback` did. ``action`` is one of
    ``promoted`` (champion moved), ``registered`` (new version, champion kept), ``kept`` (nothing new,
    champion kept), ``unchanged`` (best is already champion), ``rolled_back``."""

    action: str
    model_name: str
    version: str | None
    champion: str | None
    previous: str | None
    message: str
    candidate: Candidate | None = None
    registered_new_version: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Registered model names: MLflow refuses '/' and ':' -- but only after the model was packaged and logged;
# '@' makes ``models:/name@alias`` ambiguous; quotes and backslashes break registry search filters.
_BAD_NAME_CHARS = "/:@'\"\\`"


def validate_model_name(model_name: str | None) -> str:
    """Refuse, before any work, a registered model name MLflow or this platform cannot use."""
    if not model_name or not model_name.strip():
        raise ConfigError("model_name", "empty registered model name")
    bad = sorted({c for c in model_name if c in _BAD_NAME_CHARS or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ConfigError(
            "model_name",
            f"{model_name!r} contains {shown}: a registered model name cannot hold / : @ quotes, backslashes "
            "or control characters (MLflow paths, models:/name@alias URIs, registry search filters)",
        )
    if len(model_name) > 250:
        raise ConfigError("model_name", f"{len(model_name)} characters; at most 250")
    return model_name


def _client():
    from mlflow import MlflowClient

    from isc.tracking import configure

    configure(check=True)
    return MlflowClient()


def resolve_experiment(experiment: str | None) -> Any:
    """The experiment to search (:func:`isc.contract.experiment_choice`; never created here)."""
    from isc.tracking import experiment_id

    client = _client()
    return client.get_experiment(experiment_id(experiment, create=False))


def _fingerprint_of(ground_truth: str | Path) -> str:
    from isc.io import read_ground_truth
    from isc.metrics import ground_truth_fingerprint

    return ground_truth_fingerprint(read_ground_truth(ground_truth))


def _search_all_runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token,
            order_by=["metrics.average_precision DESC"],
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_best_evaluation(experiment: str | None = None, ground_truth: str | Path | None = None) -> Candidate:
    """The FINISHED evaluation run with the highest µAP on one ground truth (see module doc).

    Raises ``ConfigError('ground_truth', ...)`` listing the fingerprints when runs were scored on
    several ground truths and none was chosen, or when none matches the given file.
    """
    client = _client()
    exp = resolve_experiment(experiment)
    runs = _search_all_runs(
        client, exp.experiment_id, f"attributes.status = 'FINISHED' and tags.`{Tag.STEP}` = '{Step.EVALUATE}'"
    )
    usable = [r for r in runs if "average_precision" in r.data.metrics and r.data.tags.get(Tag.MODEL_REF)]
    skipped = len(runs) - len(usable)
    if skipped:
        log.info("%d evaluation run(s) skipped: no isc.model_ref (e.g. hash baselines) or no µAP", skipped)
    if not usable:
        raise ISCError(
            f"experiment '{exp.name}' has no FINISHED evaluation run (tag isc.step=evaluate) with a model "
            "reference (tag isc.model_ref) and an average_precision metric"
        )
    by_fp: dict[str, list[Any]] = {}
    for r in usable:
        by_fp.setdefault(r.data.tags.get(Tag.GT_FINGERPRINT, ""), []).append(r)

    def listing() -> str:
        return "; ".join(
            f"{fp[:12] or '<none>'} ({len(rs)} run(s), e.g. {rs[0].data.tags.get(Tag.GT_PATH, '?')})"
            for fp, rs in sorted(by_fp.items())
        )

    if ground_truth:
        fp = _fingerprint_of(ground_truth)
        if fp not in by_fp:
            raise ConfigError(
                "ground_truth",
                f"no evaluation run in '{exp.name}' was scored on {ground_truth} (fingerprint {fp[:12]}); "
                f"fingerprints found: {listing()}",
            )
        chosen = by_fp[fp]
    else:
        if len(by_fp) > 1:
            raise ConfigError(
                "ground_truth",
                "evaluation runs were scored on different ground truths and cannot be compared; pass "
                f"--ground-truth to choose one. Fingerprints: {listing()}",
            )
        chosen = next(iter(by_fp.values()))
    best = max(chosen, key=lambda r: (r.data.metrics["average_precision"], -r.info.start_time))
    return Evaluation.from_run(best)


def _all_versions(client: Any, model_name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        return []
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{model_name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _alias_version(client: Any, model_name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _record(writer: RegistryWriter, model_name: str, entry: dict[str, Any]) -> None:
    """Append a promotion record as a registered-model tag ``isc.promotion.<time>-<id>`` (aliases keep no
    history; :meth:`RegistryWriter.append_record` says why the key is not a count)."""
    writer.append_record(model_name, Tag.PROMOTION_PREFIX, entry)


def _versions_of(client: Any, model_name: str, eval_run_id: str) -> list[Any]:
    """Versions of ``model_name`` registered from evaluation run ``eval_run_id``, lowest first."""
    found = [v for v in _all_versions(client, model_name) if v.tags.get(Tag.SOURCE_EVAL_RUN) == eval_run_id]
    return sorted(found, key=lambda v: int(v.version))


# Locks this process holds (path -> depth): promote() holds the lock around register_once(), which takes it
# too; flock on a second open file of the same path would wait for ourselves.
_HELD_LOCKS: dict[Path, int] = {}


@contextlib.contextmanager
def _registration_lock(model_name: str) -> Iterator[None]:
    """Serialise registrations and promotions of ``model_name`` on this store among the processes of this
    machine (re-entrant within a process). Promoters on other machines are not seen by it: for them the
    lowest-version rule of :func:`register_once` and the :class:`RegistryWriter` keep the registry right."""
    import fcntl

    from isc.tracking import default_tracking_uri

    key = hashlib.sha256(f"{default_tracking_uri()}\0{model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"isc-promote-{key}.lock"
    if _HELD_LOCKS.get(path):
        _HELD_LOCKS[path] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[path] -= 1
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD_LOCKS[path] = 1
        try:
            yield
        finally:
            _HELD_LOCKS.pop(path, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def register_once(candidate: Candidate, model_name: str = DEFAULT_MODEL_NAME) -> tuple[Any, bool]:
    """``(version, registered_now)``: the one version of ``model_name`` for ``candidate``'s evaluation run.

    Reuses an existing version; otherwise registers under a machine-wide lock, then resolves a race with
    promoters on other machines: the lowest version of this evaluation wins, a higher one of our own
    making is deleted (its promote run is tagged ``isc.duplicate_of``).
    """
    client = _client()
    existing = _versions_of(client, model_name, candidate.run_id)
    if existing:
        return existing[0], False
    with _registration_lock(model_name):
        existing = _versions_of(client, model_name, candidate.run_id)
        if existing:
            return existing[0], False
        mine = register_candidate(candidate, model_name)
    winner = _versions_of(client, model_name, candidate.run_id)[0]
    if str(winner.version) == str(mine.version):
        return mine, True
    log.warning("evaluation run %s was registered concurrently as %s v%s; deleting our duplicate v%s",
                candidate.run_id, model_name, winner.version, mine.version)
    client.delete_model_version(model_name, str(mine.version))
    if mine.run_id:
        with contextlib.suppress(Exception):
            client.set_tag(mine.run_id, Tag.DUPLICATE_OF, f"{model_name}/{winner.version}")
    return winner, False


# Tags of a training run that say it was tuned; promotion copies them onto the registered version.
TUNE_TAGS = (Tag.TUNE_STUDY, Tag.TUNE_TRIAL, Tag.TUNE_PARAMS, Tag.TUNE_STUDY_RUN, Tag.TUNE_STAGE, Tag.TUNE_CANDIDATE)


def _training_run(client: Any, model_ref: str) -> Any | None:
    """The MLflow run that trained ``model_ref`` when the reference names one (run id, ``<id>:N``, runs:/)."""
    from mlflow.exceptions import MlflowException

    from isc.contract import ModelRef

    try:
        run_id = ModelRef.parse(model_ref).run_id
        return client.get_run(run_id) if run_id else None
    except (ConfigError, MlflowException):
        return None


def _scores(client: Any, candidate: Candidate) -> list[tuple[str, float, str]]:
    """``(ground truth file, µAP, run id)`` of the newest FINISHED evaluation of the candidate's descriptors
    (same model and NES bank) on each ground truth: the val score that chose it and the held-out test one."""
    eval_run = client.get_run(candidate.run_id)
    runs = _search_all_runs(client, eval_run.info.experiment_id,
                            f"attributes.status = 'FINISHED' and tags.`{Tag.STEP}` = '{Step.EVALUATE}'")
    newest: dict[str, Any] = {}
    for r in runs:
        tags = r.data.tags
        if (tags.get(Tag.MODEL_REF) != candidate.model_ref or (tags.get(Tag.NES_BANK) or None) != candidate.nes_bank
                or "average_precision" not in r.data.metrics):
            continue
        gt = tags.get(Tag.GT_PATH, "?")
        if gt not in newest or r.info.start_time > newest[gt].info.start_time:
            newest[gt] = r
    return [(Path(gt).name, r.data.metrics["average_precision"], r.info.run_id) for gt, r in sorted(newest.items())]


def version_description(client: Any, candidate: Candidate, train_run: Any | None) -> str:
    """The registered version's description: which stage trained it, from what, its µAPs and, when tuned,
    the study, trial and values (what a reader of the registry needs without opening the runs)."""
    lines = []
    if train_run is not None:
        tags, params = train_run.data.tags, train_run.data.params
        from isc.train.config import SEED_SCRIPTS

        config, stage = params.get("config", "?"), tags.get(Tag.STAGE, "?")
        seed = f", the seed's {SEED_SCRIPTS[stage]}" if SEED_SCRIPTS.get(stage) else ""
        lines.append(f"stage: {train_run.info.run_name} ({Path(config).name}, {stage}{seed}), "
                     f"training run {train_run.info.run_id}")
        lines.append(f"starts from: {tags.get(Tag.START_KIND, '?')} {tags.get(Tag.START_CHECKPOINT, '')}".rstrip())
    else:
        lines.append(f"stage: not an MLflow training run (model {candidate.model_ref})")
    chosen = Path(candidate.gt_path).name
    scores = ", ".join(f"{gt} {ap:.4f}" + (" (chose this version)" if run_id == candidate.run_id else "")
                       for gt, ap, run_id in _scores(client, candidate))
    nes = "after NES" if candidate.nes_bank else "raw descriptors"
    lines.append(f"µAP ({nes}): {scores or f'{chosen} {candidate.average_precision:.4f}'}")
    settings = candidate_settings(candidate)
    lines.append(f"serves with: {settings.label} (the extraction settings of the evaluation that chose it)"
                 if settings else "serves with: its training size, no TTA (the evaluation recorded no settings)")
    tags = train_run.data.tags if train_run is not None else {}
    if Tag.TUNE_STUDY in tags:
        how = ("retrained with these values for the stage's full epochs" if tags.get(Tag.TUNE_CANDIDATE) == "retrain"
               else "the trial's own model")
        lines.append(f"tuned: study {tags[Tag.TUNE_STUDY]}, trial {tags.get(Tag.TUNE_TRIAL, '?')} of "
                     f"{tags.get(Tag.TUNE_STAGE, '?')}, values {tags.get(Tag.TUNE_PARAMS, '{}')}; {how}")
    lines.append(f"evaluation run {candidate.run_id} ({candidate.protocol} protocol on {candidate.gt_path})")
    return "\n".join(lines)


def candidate_settings(candidate: Candidate) -> Any:
    """The extraction settings the candidate was scored with (its evaluation run's ``isc.input_size`` /
    ``isc.tta``); None for runs that predate them (the version then serves at the training size)."""
    from isc.settings import ExtractionSettings

    if not candidate.input_size:
        return None
    return ExtractionSettings(int(candidate.input_size), bool(candidate.tta))


def register_candidate(candidate: Candidate, model_name: str = DEFAULT_MODEL_NAME) -> Any:
    """Package the candidate's checkpoint (+ NES bank) as the pyfunc and register a new version.

    Logs into a ``promote`` run (tag ``isc.step=promote``) of the candidate's experiment, or into the
    run ``mlflow run`` started. Returns the ``ModelVersion`` with its provenance tags set.
    """
    import mlflow

    from isc.models import resolve_checkpoint
    from isc.tracking import git_commit, log_params, resolve_artifact, tracked_run

    client = _client()
    eval_run = client.get_run(candidate.run_id)
    experiment = client.get_experiment(eval_run.info.experiment_id).name
    checkpoint = resolve_checkpoint(candidate.model_ref)
    bank = None
    if candidate.nes_bank:
        try:
            bank = resolve_artifact(candidate.nes_bank)
        except FileNotFoundError as exc:
            raise ConfigError("nes_bank", f"evaluation run {candidate.run_id}: {exc}") from exc
    with tracked_run(experiment=experiment, run_name=f"promote-{candidate.run_id[:8]}",
                     tags={Tag.STEP: Step.PROMOTE}) as run:
        log_params({"model_name": model_name, "source_eval_run": candidate.run_id, "model_ref": candidate.model_ref})
        settings = candidate_settings(candidate)
        if settings is not None:
            log_params({"input_size": settings.input_size, "tta": str(settings.tta).lower()}, prefix="serves.")
        info = log_descriptor_model(checkpoint, bank=bank, nes_params=candidate.nes_params, settings=settings)
        tags = {
            Tag.AVERAGE_PRECISION: f"{candidate.average_precision:.6f}",
            Tag.GT_FINGERPRINT: candidate.gt_fingerprint,
            Tag.GT_PATH: candidate.gt_path,
            Tag.SOURCE_EVAL_RUN: candidate.run_id,
            Tag.MODEL_REF: candidate.model_ref,
            Tag.GIT_COMMIT: candidate.git_commit or git_commit() or "unknown",
        }
        if candidate.recall_p90 is not None:
            tags[Tag.RECALL_P90] = f"{candidate.recall_p90:.6f}"
        if settings is not None:  # what the version serves with (also its pyfunc's model_config)
            tags[Tag.INPUT_SIZE], tags[Tag.TTA] = str(settings.input_size), str(settings.tta).lower()
        if candidate.nes_bank:
            tags[Tag.NES_BANK] = candidate.nes_bank
            tags[Tag.NES_PARAMS] = json.dumps(candidate.nes_params, sort_keys=True)
        train_run = _training_run(client, candidate.model_ref)
        if train_run is not None:  # a tuned model: which study, trial and values made it
            tags.update({k: train_run.data.tags[k] for k in TUNE_TAGS if k in train_run.data.tags})
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
        RegistryWriter(client).set_version_description(model_name, str(version.version),
                                                       version_description(client, candidate, train_run))
        if run is not None:
            mlflow.set_tags({Tag.REGISTERED_MODEL: model_name, Tag.REGISTERED_VERSION: str(version.version)})
    log.info("registered %s version %s from evaluation run %s", model_name, version.version, candidate.run_id)
    return client.get_model_version(model_name, version.version)


@dataclass(frozen=True)
class Rules:
    """How a candidate must compare with ``@champion`` to replace it (see :func:`promote`)."""

    min_improvement: float = 0.0
    force: bool = False
    on_other_gt: str = "error"


@dataclass(frozen=True)
class Decision:
    """What promotion will do, decided before any write: ``action`` as in :class:`PromotionResult`;
    ``move`` says whether ``@champion`` moves to the candidate (and the old champion to ``@previous``)."""

    action: str
    message: str
    move: bool
    champion_after: str | None
    previous_after: str | None


def decide(candidate: Candidate, version: Any, registered: bool, champion: Any | None, previous: Any | None,
           rules: Rules, model_name: str = DEFAULT_MODEL_NAME) -> Decision:
    """The promotion decision, a pure function of what the registry holds (no reads, no writes).

    ``version``: the candidate's registered version; ``champion`` / ``previous``: the versions behind the
    aliases (or None). Raises ``ConfigError('ground_truth')`` when the champion was scored on another ground
    truth and ``rules.on_other_gt`` is ``"error"``.
    """
    v = str(version.version)
    champ_v = str(champion.version) if champion is not None else None
    prev_v = str(previous.version) if previous is not None else None
    ap = candidate.average_precision

    def stay(action: str, message: str) -> Decision:
        return Decision(action, message, False, champ_v, prev_v)

    if champ_v == v:
        return stay("unchanged", f"{model_name} v{v} (µAP {ap:.4f}, eval run {candidate.run_id}) is already @champion")
    if version.tags.get(Tag.ROLLED_BACK) == "true" and not rules.force:
        return stay("registered" if registered else "kept",
                    f"best evaluation run {candidate.run_id} is {model_name} v{v}, which was rolled back; "
                    "not re-promoting it (use --force to override)")
    if champion is not None and not rules.force:
        champ_fp = champion.tags.get(Tag.GT_FINGERPRINT, "")
        if champ_fp != candidate.gt_fingerprint:
            why = (f"@champion ({model_name} v{champ_v}) was scored on ground truth {champ_fp[:12] or '<none>'} "
                   f"({champion.tags.get(Tag.GT_PATH, '?')}) but the candidate on {candidate.gt_fingerprint[:12]} "
                   f"({candidate.gt_path}); µAPs on different ground truths cannot be compared")
            if rules.on_other_gt == "keep":
                return stay("kept", f"{why}; registered the candidate as {model_name} v{v} and kept the champion "
                            f"(to replace it: isc promote --ground-truth {candidate.gt_path} --force)")
            raise ConfigError("ground_truth", f"{why} (evaluate both on one ground truth, or pass --force)")
        champ_ap = float(champion.tags.get(Tag.AVERAGE_PRECISION, "nan"))
        if not ap > champ_ap + rules.min_improvement:
            return stay("registered" if registered else "kept",
                        f"candidate {model_name} v{v} µAP {ap:.4f} does not beat @champion v{champ_v} µAP "
                        f"{champ_ap:.4f} by more than {rules.min_improvement:g}; champion kept")
    old = f"v{champ_v} -> @previous" if champ_v else "no previous champion"
    return Decision("promoted", f"{model_name} v{v} (µAP {ap:.4f}, eval run {candidate.run_id}) is now @champion "
                    f"({old})", True, v, champ_v or prev_v)


def apply(writer: RegistryWriter, model_name: str, candidate: Candidate, version: Any, champion: Any | None,
          decision: Decision, force: bool = False) -> None:
    """Carry out a ``promoted`` decision: aliases, the version's promotion tags, the history record.
    Every write goes through ``writer``, so a concurrent promoter doing the same cannot make it fail."""
    if not decision.move:
        return
    v = str(version.version)
    if champion is not None:
        writer.set_alias(model_name, PREVIOUS, str(champion.version))
    writer.set_alias(model_name, CHAMPION, v)
    writer.set_version_tags(model_name, v, {
        Tag.PROMOTED_AT: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        Tag.PROMOTED_OVER: str(champion.version) if champion is not None else "",
    })
    _record(writer, model_name, {
        "action": "promote", "champion": v, "previous": str(champion.version) if champion is not None else None,
        "average_precision": candidate.average_precision, "source_eval_run": candidate.run_id, "forced": force,
    })


def promote(
    experiment: str | None = None,
    ground_truth: str | Path | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    min_improvement: float = 0.0,
    force: bool = False,
    on_other_gt: str = "error",
) -> PromotionResult:
    """Register the best evaluation run of ``experiment`` and move ``@champion`` if it wins (module doc).

    ``min_improvement``: µAP margin (absolute, e.g. 0.01) the candidate must exceed the champion by.
    ``force``: move the alias even when the candidate does not win or was scored on another ground truth.
    ``on_other_gt``: when ``@champion`` was scored on another ground truth (so no comparison is possible),
    ``"error"`` raises ``ConfigError``; ``"keep"`` registers the candidate, keeps the champion and says so
    (action ``"kept"``): what a pipeline wants after the data changed, rather than failing at its last step.

    Reading the aliases, deciding and writing happen under the machine-wide lock, so promoters on one
    machine see each other's result (the second finds the candidate already ``@champion``).
    """
    if on_other_gt not in ("error", "keep"):
        raise ConfigError("on_other_gt", f"must be 'error' or 'keep', got '{on_other_gt}'")
    if min_improvement < 0:
        raise ConfigError("min_improvement", f"must be >= 0, got {min_improvement}")
    validate_model_name(model_name)
    candidate = find_best_evaluation(experiment, ground_truth)
    client = _client()
    with _registration_lock(model_name):
        version, registered = register_once(candidate, model_name)
        champion = _alias_version(client, model_name, CHAMPION)
        previous = _alias_version(client, model_name, PREVIOUS)
        decision = decide(candidate, version, registered, champion, previous,
                          Rules(min_improvement, force, on_other_gt), model_name)
        apply(RegistryWriter(client), model_name, candidate, version, champion, decision, force)
    print(f"promote: {decision.message}", flush=True)
    return PromotionResult(decision.action, model_name, str(version.version), decision.champion_after,
                           decision.previous_after, decision.message, candidate, registered)


def rollback(model_name: str = DEFAULT_MODEL_NAME) -> PromotionResult:
    """Move ``@champion`` back to ``@previous``; the demoted version is tagged ``isc.rolled_back=true``."""
    validate_model_name(model_name)
    client = _client()
    writer = RegistryWriter(client)
    with _registration_lock(model_name):
        champion = _alias_version(client, model_name, CHAMPION)
        previous = _alias_version(client, model_name, PREVIOUS)
        if previous is None:
            raise ISCError(f"{model_name} has no @previous version to roll back to")
        writer.set_alias(model_name, CHAMPION, str(previous.version))
        writer.delete_alias(model_name, PREVIOUS)
        if champion is not None:
            writer.set_version_tags(model_name, str(champion.version), {
                Tag.ROLLED_BACK: "true", Tag.ROLLED_BACK_AT: time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _record(writer, model_name, {"action": "rollback", "champion": str(previous.version),
                                     "demoted": str(champion.version) if champion else None})
    message = (f"{model_name} @champion rolled back to v{previous.version}"
               + (f" (v{champion.version} marked {Tag.ROLLED_BACK}=true)" if champion else ""))
    print(f"promote: {message}", flush=True)
    return PromotionResult("rolled_back", model_name, str(previous.version), str(previous.version), None, message)
