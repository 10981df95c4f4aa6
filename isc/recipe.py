"""The recipe as data: its stages, the profiles that chain them (demo, full, smoke), what each stage starts
from and hands on, and the checks of a job's arguments against them.

Both the driver (:mod:`isc.driver`, which runs a profile) and tuning (:mod:`isc.tune`, which fine-tunes one
of its stages) read it; neither imports the other for it. A *stage* is one step of the recipe (stage 0,
1, 1b, 2, 3, 4); the kind of views a stage trains on is its config's ``stage`` field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from isc.errors import ConfigError
from isc.train.config import check_batch, load_config, parse_epochs, parse_overrides


@dataclass(frozen=True)
class Stage:
    """One training stage of a profile and the checkpoint it starts from.

    start: ``pretrained`` (the config's backbone weights), ``init`` (weights only: the seed's --weight)
    or ``resume`` (full state: the seed's --resume). ``source`` names an earlier stage of the profile,
    ``checkpoint`` the index N of that stage's ``checkpoint_000N`` (the seed hands on specific epochs, not
    the last); None = the source's final model. ``overrides`` are fixed on top of the config (stage 0 is
    stage 1's config with ``epochs: 0``: the starting model itself, scored and offered to promotion).
    """

    name: str
    config: str
    start: str = "pretrained"
    source: str | None = None
    checkpoint: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Profile:
    """A chain of stages, the tune config, and the grid of extraction settings the best candidates are scored
    under on val (:mod:`isc.settings`; sizes in px, 0 = the training size): the registered version serves
    with the best. A grid of one setting skips the step.

    ``settings_top``: how many candidates (by val µAP at their training size) get the grid; 0 = every one.
    ``settings_tta_sizes``: TTA is tried at that many sizes, the best without it (0 = every size).
    Why top-k and halving: on 2 CPU cores the whole grid (3 sizes x TTA off/on) on every one of the demo's
    7 candidates, each re-extracted at its choice, projected to ~35 min against the main job's ~10; the
    grid's cost is mostly TTA (6 passes, ~7x a plain pass) and the re-extraction of the training images
    NES needs at the chosen setting (docs/evaluation.md has the measured figures)."""

    stages: tuple[Stage, ...]
    tune_config: str
    settings_sizes: str = "0,160,224"
    settings_tta: str = "false,true"
    settings_top: int = 2
    settings_tta_sizes: int = 1


def recipe_profile(prefix: str, tune_config: str, settings_top: int = 2) -> Profile:
    """The seed's chain: v83 5 epochs -> v83 resumed to 10 -> v86 from 1b's checkpoint_0005 -> v98 from
    v86's checkpoint_0005 -> v107 from v98's checkpoint_0001; plus stage 0, the untouched start (stage 1's
    config with no epoch), which stage 1 starts from."""
    cfg = f"isc/configs/{prefix}"
    return Profile((
        Stage("stage0", f"{cfg}stage1.yaml", overrides=(("epochs", 0),)),
        # stage 1 starts from stage 0's model: the same pretrained weights and head init, built once
        Stage("stage1", f"{cfg}stage1.yaml", "init", "stage0"),
        Stage("stage1b", f"{cfg}stage1b.yaml", "resume", "stage1", 4),
        Stage("stage2", f"{cfg}stage2.yaml", "init", "stage1b", 5),
        Stage("stage3", f"{cfg}stage3.yaml", "init", "stage2", 5),
        Stage("stage4", f"{cfg}stage4.yaml", "init", "stage3", 1),
    ), tune_config, settings_top=settings_top)


PROFILES: dict[str, Profile] = {
    # demo: the grid for the val-best candidate only: on 2 CPU cores a second one choosing 224 px + TTA (its
    # grid, its re-extraction) was projected at ~3.5 min more, past the job's 15-min budget (bench_settings.py)
    "demo": recipe_profile("demo_", "isc/configs/tune.yaml", settings_top=1),
    "full": recipe_profile("", "isc/configs/tune_full.yaml"),
    # seconds-long pipeline check for tests and CI (tiny from-scratch network, two stages)
    "smoke": Profile((Stage("stage1", "isc/configs/smoke.yaml"),
                      Stage("stage2", "isc/configs/smoke_stage2.yaml", "init", "stage1")),
                     "isc/configs/tune_smoke.yaml", settings_sizes="0,64", settings_tta="false,true", settings_top=2),
}


@dataclass(frozen=True)
class SettingsPlan:
    """The main job's val grid of extraction settings (see :class:`Profile`)."""

    sizes: str
    tta: str
    top: int
    tta_sizes: int

    def is_grid(self) -> bool:
        return len([x for x in self.sizes.split(",") if x.strip()]) * len(
            [x for x in self.tta.split(",") if x.strip()]) > 1


def settings_plan(profile: str, given: dict[str, Any] | None = None) -> SettingsPlan:
    """The profile's grid with what ``given`` sets (``sizes``, ``tta``, ``top``, ``tta_sizes``; None = unset)."""
    p = PROFILES[profile]
    out = {"sizes": p.settings_sizes, "tta": p.settings_tta, "top": p.settings_top, "tta_sizes": p.settings_tta_sizes}
    out.update({k: v for k, v in (given or {}).items() if v not in (None, "")})
    return SettingsPlan(**out)


def check_arguments(profile: str, n_trials: int, overrides: str = "", settings_sizes: str = "",
                    settings_tta: str = "", settings_top: int | None = None,
                    settings_tta_sizes: int | None = None) -> None:
    """The main job's arguments, checked once, before its run opens (``entrypoints/main.py`` calls it)."""
    from isc.settings import parse_sizes, parse_tta

    if settings_sizes:
        parse_sizes(settings_sizes, 128)
    if settings_tta:
        parse_tta(settings_tta)
    for name, value in (("settings_top", settings_top), ("settings_tta_sizes", settings_tta_sizes)):
        if value is not None and value < 0:
            raise ConfigError(name, f"must be >= 0 (0 = all), got {value}")
    if profile not in PROFILES:
        raise ConfigError("profile", f"unknown profile '{profile}' (choose from {sorted(PROFILES)})")
    if n_trials < 0:
        raise ConfigError("n_trials", f"must be >= 0, got {n_trials}")
    if overrides:
        parse_overrides(overrides)  # a bad mapping fails here, before any run


def check_processes(profile: str, nproc_per_node: int, overrides: str = "") -> None:
    """Every training stage's batch works on ``nproc_per_node`` processes (the global batch splits evenly, each
    process sees images of two labels; v107 takes 1 pair + 2G-2 negatives per process), checked before the
    main job's run opens rather than when a late stage starts. One message names every stage that fails."""

    if nproc_per_node < 1:
        raise ConfigError("nproc_per_node", f"must be >= 1, got {nproc_per_node}")
    extra = dict(parse_overrides(overrides)) if overrides else {}
    bad = []
    for stage in PROFILES[profile].stages:
        try:
            check_batch(load_config(stage.config, **{**extra, **dict(stage.overrides)}), nproc_per_node)
        except ConfigError as exc:
            bad.append(f"{stage.name}: {exc}")
    if bad:
        raise ConfigError("nproc_per_node", f"{nproc_per_node} process(es) per stage do not fit: " + "; ".join(bad))


def tuned_stage(profile: str, stage: str | None = None) -> Stage:
    """The stage ``isc tune`` tunes: ``stage`` by name, by default the profile's last fine-tuning stage.

    Refused: a stage without fine-tuning (stage 0) and one that resumes another's full state (stage 1b:
    its optimizer and memory bank come from the checkpoint, so sampled lr/memory sizes would not apply).
    """
    if profile not in PROFILES:
        raise ConfigError("profile", f"unknown profile '{profile}' (choose from {sorted(PROFILES)})")
    stages = PROFILES[profile].stages
    tunable = [s for s in stages if dict(s.overrides).get("epochs") != 0 and s.start != "resume"]
    if stage is None:
        return tunable[-1]
    chosen = next((s for s in stages if s.name == stage), None)
    if chosen is None:
        raise ConfigError("stage", f"profile '{profile}' has no stage '{stage}' ({', '.join(s.name for s in stages)})")
    if chosen not in tunable:
        raise ConfigError("stage", f"{stage} of profile '{profile}' cannot be tuned (no fine-tuning, or it resumes "
                                   f"another stage's full state); tunable: {', '.join(s.name for s in tunable)}")
    return chosen


def start_reference(stage: Stage, runs: dict[str, str]) -> str:
    """What ``init_from`` / ``resume_from`` get: ``<run id>:<N>`` (checkpoint_000N) or the run id."""
    if stage.source is None:
        return ""
    run_id = runs[stage.source]
    return run_id if stage.checkpoint is None else f"{run_id}:{stage.checkpoint}"


def handoff_epochs(stages: tuple[Stage, ...]) -> dict[str, list[int]]:
    """Stage name -> the epoch indices later stages start from (``<run id>:N``). The driver passes them to
    that stage's training as ``keep_epochs``, so checkpoint retention never prunes a hand-off."""
    out: dict[str, set[int]] = {}
    for stage in stages:
        if stage.source is not None and stage.checkpoint is not None:
            out.setdefault(stage.source, set()).add(stage.checkpoint)
    return {name: sorted(epochs) for name, epochs in out.items()}


def stage_overrides(stage: Stage, extra: dict[str, Any], handoffs: dict[str, list[int]]) -> dict[str, Any]:
    """The training overrides of one stage: the job's, the stage's own, and its hand-off epochs added to
    any ``keep_epochs`` given."""

    out = {**extra, **dict(stage.overrides)}
    if handoffs.get(stage.name):
        out["keep_epochs"] = sorted(set(parse_epochs(out.get("keep_epochs"))) | set(handoffs[stage.name]))
    return out


def start_label(stage: Stage) -> str:
    """The summary's "starts from" cell: ``resume stage1 checkpoint_0004`` / ``pretrained``."""
    if stage.source is None:
        return "pretrained"
    ckpt = f" checkpoint_{stage.checkpoint:04d}" if stage.checkpoint is not None else " final model"
    return f"{stage.start} {stage.source}{ckpt}"
