"""Promotion with registry aliases: register the best evaluated model and move ``@champion`` if it wins.

Why aliases: registry *stages* are deprecated in MLflow 3; an alias points at exactly one version and
moving it is the promotion. Aliases keep no history, so every promotion/rollback is also recorded as a
registered-model tag ``isc.promotion.<time>-<id>`` (JSON) and as tags on the versions involved.

The flow of :func:`promote`:

1. :func:`find_best_evaluation`: the FINISHED ``isc evaluate`` runs (tag ``isc.step=evaluate``) of an
   experiment that were scored on one ground truth (tag ``isc.gt_fingerprint``; a ``--ground-truth``
   file selects it, otherwise the runs must agree), that name the model they scored (``isc.model_ref``),
   ranked by ``average_precision`` (µAP).
2. The best run is registered once (:func:`registry.register.register_once`): a version tagged
   ``isc.source_eval_run=<run>`` already existing is reused, so running promotion twice creates no
   duplicate version; concurrent registrations are guarded there.
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

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from isc.contract import CHAMPION, DEFAULT_MODEL_NAME, PREVIOUS, Evaluation, Step, Tag
from isc.errors import ConfigError, ISCError
from isc.tracking import experiment_id
from registry.register import register_once, registration_lock, registry_client, search_all_runs
from registry.writes import RegistryWriter

log = logging.getLogger(__name__)


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
    candidate: Evaluation | None = None
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


def resolve_experiment(experiment: str | None) -> Any:
    """The experiment to search (:func:`isc.contract.experiment_choice`; never created here)."""

    client = registry_client()
    return client.get_experiment(experiment_id(experiment, create=False))


def _fingerprint_of(ground_truth: str | Path) -> str:
    from isc.io import read_ground_truth
    from isc.metrics import ground_truth_fingerprint

    return ground_truth_fingerprint(read_ground_truth(ground_truth))


def find_best_evaluation(experiment: str | None = None, ground_truth: str | Path | None = None) -> Evaluation:
    """The FINISHED evaluation run with the highest µAP on one ground truth (see module doc).

    Raises ``ConfigError('ground_truth', ...)`` listing the fingerprints when runs were scored on
    several ground truths and none was chosen, or when none matches the given file.
    """
    client = registry_client()
    exp = resolve_experiment(experiment)
    runs = search_all_runs(
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


def decide(candidate: Evaluation, version: Any, registered: bool, champion: Any | None, previous: Any | None,
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


def apply(writer: RegistryWriter, model_name: str, candidate: Evaluation, version: Any, champion: Any | None,
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
    client = registry_client()
    with registration_lock(model_name):
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
    client = registry_client()
    writer = RegistryWriter(client)
    with registration_lock(model_name):
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
