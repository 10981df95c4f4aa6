"""The main job's inputs, checked once before its first step: every problem named, in one message.

Why: a profile chains days of GPU training; a pairs file, a ground truth or a reference folder that only the
last stage reads used to fail after the stages before it had trained. ``check_main_inputs`` reads every
stage's config (with the job's overrides) and every file the job will need -- the stage-4 pairs, the
ground truths that choose and score the champion, the reference pool the negatives are drawn from, the
tuning split, the free disk the checkpoints need where that can be told -- and raises one ``ConfigError``
listing them all. It writes nothing and opens no run; on DISC21 it lists the image folders once (seconds).

Which ground truth does what (``GroundTruths``):

* ``test``: the summary's numbers -- ``ground_truth_test.csv``, else the data's full ground truth
  (``ground_truth.csv`` / ``public_ground_truth.csv``);
* ``select``: chooses the champion -- ``ground_truth_val.csv`` when present (then ``test`` stays held out
  from the choice), else ``test`` (the summary says the rows are then not held out);
* stage 4 (v107) trains on its pairs file (``isc.train.config.resolve_pairs_path``: ``pairs``, else
  ``public_ground_truth.csv`` as the seed, else ``ground_truth_train.csv``). Neither ``select`` nor ``test``
  (nor the tuning split) may share a query with it: the seed's local 0.9479 was scored on its training pairs,
  and this platform refuses to.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isc.errors import ConfigError, ISCError
from isc.tune import load_tune_config
from isc.tune.objective import resolve_validation_gt

# what one checkpoint holds besides the weights: SGD momentum (one buffer per weight) -> 2 x the weights
_STATE_COPIES = 2


@dataclass(frozen=True)
class GroundTruths:
    test: Path  # reported (held out when a val split exists)
    select: Path  # chooses the champion


def choose_ground_truths(data_dir: Path) -> GroundTruths:
    """The test and selection ground truths of a DISC21-layout folder (see the module docstring)."""
    from isc.data.disc21 import DISC21

    ds = DISC21(data_dir)
    test = ds.ground_truth("test")
    if not test.exists():
        test = ds.ground_truth()
    val = ds.ground_truth("val")
    return GroundTruths(test=test, select=val if val.exists() and val != test else test)


def check_main_inputs(profile: str, data_dir: str | Path, overrides: dict[str, Any] | None = None, n_trials: int = 0,
                      world_size: int = 1, out_root: str | Path | None = None) -> GroundTruths:
    """Check every stage's config and every input of the main job; raise one ``ConfigError`` naming all.

    ``world_size``: processes each training stage runs as (v107's negatives and batch depend on it).
    ``out_root``: where checkpoints are written (its file system's free space is checked). Returns the
    ground truths the job scores and chooses on. The checks run in the order the job meets the inputs,
    each adding to one list of problems instead of stopping at the first.
    """
    from isc.data.disc21 import DISC21

    data_dir = Path(data_dir)
    found = _Findings(DISC21(data_dir))
    gts = choose_ground_truths(data_dir)
    if not found.ds.root.is_dir():
        raise ConfigError("data", f"{found.ds.root} does not exist")
    configs = _stage_configs(profile, overrides, world_size, found)
    scored = _scored_ground_truths(gts, data_dir, found)
    if n_trials > 0:
        _check_tuning(profile, configs, scored, found)
    read = {role: found.ground_truth(path, role) for role, path in scored.items()}
    for stage, cfg in configs:
        _check_stage_data(f"{stage.name} ({stage.config})", cfg, world_size, scored, read, found)
    disk = _disk_problem([cfg for _, cfg in configs], out_root)
    if disk:
        found.problems.append(disk)
    if found.problems:
        problems = list(dict.fromkeys(found.problems))
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError("data", f"{len(problems)} problem(s) found before any training run "
                                  f"(profile {profile}, {found.ds.root}):\n{listing}")
    return gts


class _Findings:
    """The job's data folder, its image listings (each read once) and the problems found so far, in order."""

    def __init__(self, ds: Any):
        self.ds = ds
        self.problems: list[str] = []
        self._listings: dict[str, dict[str, Path]] = {}

    def images(self, split: str) -> dict[str, Path]:
        from isc.data.disc21 import list_images

        if split not in self._listings:
            folder = self.ds.split_dir(split)
            self._listings[split] = dict(list_images(folder)) if folder.is_dir() else {}
        return self._listings[split]

    def ground_truth(self, path: Path, role: str) -> Any:
        """The ground truth at ``path``, or None with a problem naming its ``role``."""
        from isc.io import read_ground_truth

        try:
            return read_ground_truth(path)
        except ISCError as exc:
            self.problems.append(f"{role}: {exc}")
            return None


def _stage_configs(profile: str, overrides: dict[str, Any] | None, world_size: int,
                   found: _Findings) -> list[tuple[Any, Any]]:  # fmt: skip
    """(stage, TrainConfig) of every stage whose config loads and validates with the job's overrides."""
    from isc.recipe import PROFILES, stage_overrides
    from isc.train import config as tc

    configs = []
    for stage in PROFILES[profile].stages:
        try:
            cfg = tc.load_config(stage.config, data=str(found.ds.root),
                                 **stage_overrides(stage, dict(overrides or {}), {}))  # fmt: skip
            tc.validate_config(cfg, world_size)
        except ISCError as exc:
            found.problems.append(f"{stage.name} ({stage.config}): {exc}")
            continue
        configs.append((stage, cfg))
    return configs


def _scored_ground_truths(gts: GroundTruths, data_dir: Path, found: _Findings) -> dict[str, Path]:
    """role -> the ground truths the job scores on (none when the test one is missing: a problem)."""
    scored = {"test ground truth (the summary's numbers)": gts.test}
    if gts.select != gts.test:
        scored["selection ground truth (chooses the champion)"] = gts.select
    if not gts.test.exists():
        found.problems.append(f"test ground truth: {data_dir} has no ground_truth_test.csv, ground_truth.csv or "
                              f"public_ground_truth.csv (the summary's numbers and the champion's choice need one)")
        scored = {}
    return scored


def _check_tuning(profile: str, configs: list[tuple[Any, Any]], scored: dict[str, Path], found: _Findings) -> None:
    """The tuning split joins ``scored``; the tuned stage must train as one process (Optuna trials do)."""
    from isc.recipe import tuned_stage
    from isc.train import config as tc

    tuned = _tuning_split(profile, found.ds.root, found.problems)
    if tuned is not None:
        scored["tuning split (Optuna objective)"] = tuned
    # Optuna trials train as one process whatever nproc_per_node is: v107's 2G-2 negatives are then none
    stage = tuned_stage(profile)
    cfg = next((c for s, c in configs if s.name == stage.name), None)
    if cfg is not None:
        try:
            tc.check_batch(cfg, 1)
        except ISCError as exc:
            found.problems.append(f"n_trials > 0: tune trials of {stage.name} train as one process: {exc} "
                                  f"(set num_negatives in overrides, or pass n_trials=0)")


def _check_stage_data(label: str, cfg: Any, world_size: int, scored: dict[str, Path], read: dict[str, Any],
                      found: _Findings) -> None:  # fmt: skip
    """The images (and, for stage 4, the pairs) one stage trains on: enough for a step and its negatives."""
    from isc.train import config as tc

    ds, negatives, batch = found.ds, cfg.negatives_at(world_size), cfg.global_batch(world_size)
    if cfg.stage == tc.PAIRS_STAGE:
        _check_pairs_stage(label, cfg, batch, negatives, scored, read, found)
    elif cfg.epochs > 0:  # stage 0 (epochs 0) reads no training image
        n = min(len(found.images("train")), cfg.sample_size)
        if 0 < n < batch:
            found.problems.append(f"{label}: {n} training image(s) under {ds.training_dir}, fewer than one step's "
                                  f"global batch of {batch}")
        if cfg.stage not in tc.NEGATIVE_STAGES or not negatives:
            return
        pool = set(found.images("reference")) - ds.heldout_references()  # as build_dataset draws them
        if 0 < len(pool) < negatives:
            found.problems.append(f"{label}: {len(pool)} reference image(s) under {ds.reference_dir} outside "
                                  f"val and test, fewer than the {negatives} negatives per item")


def _check_pairs_stage(label: str, cfg: Any, batch: int, negatives: int, scored: dict[str, Path],
                       read: dict[str, Any], found: _Findings) -> None:  # fmt: skip
    """Stage 4's pairs: enough usable pairs for a step, no query shared with a scored ground truth, enough
    references outside the pairs for the negatives."""
    from isc.train import config as tc

    pairs_path = tc.resolve_pairs_path(cfg)
    pairs_gt = found.ground_truth(pairs_path, f"{label} pairs")
    if pairs_gt is None:
        return
    queries, refs = found.images("query"), found.images("reference")
    usable = [(q, r) for q, r in pairs_gt.positives if q in queries and r in refs]
    if len(usable) < batch:
        found.problems.append(f"{label}: {pairs_path} has {len(usable)} positive pair(s) with both images under "
                              f"{found.ds.root}, fewer than one step's {batch} pair(s)")
    trained = {q for q, _ in pairs_gt.positives}
    for role, gt in read.items():
        shared = trained & set(gt.queries) if gt is not None else set()
        if shared:
            found.problems.append(
                f"{role} {scored[role]} shares {len(shared)} quer(ies) with {label}'s training pairs "
                f"{pairs_path} (e.g. {sorted(shared)[:3]}): scoring on training pairs is refused; give "
                f"a ground truth disjoint from them, or stage 4 another `pairs` file")
    if negatives:
        pool = len(set(refs) - {r for _, r in pairs_gt.positives} - found.ds.heldout_references())
        if pool < negatives:
            found.problems.append(f"{label}: {pool} reference image(s) under {found.ds.reference_dir} are no "
                                  f"positive of {pairs_path} nor a val/test reference, fewer than the {negatives} "
                                  "negatives per pair")


def _tuning_split(profile: str, root: Path, problems: list[str]) -> Path | None:
    """The ground truth ``isc tune`` scores trials on (it refuses the test split); None when it cannot."""
    from isc.recipe import PROFILES

    project = Path(__file__).resolve().parent.parent
    try:
        cfg = load_tune_config(project / PROFILES[profile].tune_config, profile=profile)
        return resolve_validation_gt(root, cfg.split, cfg.ground_truth)
    except ISCError as exc:
        problems.append(f"n_trials > 0 tunes on a validation split: {exc} (or pass n_trials=0)")
        return None


def checkpoint_bytes(cfg: Any) -> int | None:
    """Bytes of one checkpoint of ``cfg``'s network: weights + momentum + memory bank (None if unknown)."""
    import torch

    try:
        import timm

        with torch.device("meta"):
            backbone = timm.create_model(cfg.backbone, features_only=True, pretrained=False)
        n = sum(p.numel() for p in backbone.parameters()) + backbone.feature_info.channels()[-1] * cfg.dim
    except Exception:  # an unknown or exotic backbone: the disk check is only "where it can tell"
        return None
    return 4 * n * _STATE_COPIES + cfg.memory_size * (cfg.dim * 4 + 8)


def _disk_problem(configs: list[Any], out_root: str | Path | None) -> str | None:
    """Free space where checkpoints go against what the stages keep there (with one in flight)."""
    if out_root is None or not configs:
        return None
    need = 0
    for cfg in configs:
        size = checkpoint_bytes(cfg)
        if size is None:
            return None
        kept = (cfg.keep_checkpoints or cfg.epochs) + len(cfg.keep_epochs) + (1 if cfg.keep_best else 0) + 1
        need += size * min(kept, cfg.epochs + 1) * (2 if cfg.log_checkpoints else 1)  # local + artifact copy
    folder = Path(out_root)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        return (f"disk: {folder} has {free / 2**30:.1f} GiB free; the profile's checkpoints need about "
                f"{need / 2**30:.1f} GiB (local copies and their artifact copies)")
    return None
