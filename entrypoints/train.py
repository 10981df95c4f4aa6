"""``isc train`` / MLproject ``train``, ``demo`` and ``train_stage*``: train one recipe stage.

Like timm's train.py: ``--config YAML`` gives the defaults, flags override them. Run it under
``torchrun --nproc-per-node N`` for DDP (``--batch-size`` is the GLOBAL batch, split over ranks).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from isc.cliutil import Parser, optional_str
from isc.errors import ConfigError
from isc.train.config import (
    FIELDS,
    TrainConfig,
    apply_overrides,
    cli_options,
    config_path,
    parse_overrides,
    read_yaml,
)

log = logging.getLogger(__name__)


def build_parser() -> Parser:
    """The flags are TrainConfig's fields (isc/train/config.py: help, group and parser next to each field)."""
    p = Parser(prog="isc train", description=__doc__.split("\n\n")[0],
               argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=optional_str, default=None,
                   help="YAML file or packaged name (demo, stage1, stage1b, stage2, stage3, stage4)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, flags, kwargs in cli_options():
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(*flags, **kwargs)
    groups["run"].add_argument("--overrides", type=optional_str,
                               help="YAML/JSON mapping applied on top of --config (e.g. '{input_size: 32, epochs: 1}')")
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
