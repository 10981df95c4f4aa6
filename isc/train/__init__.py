"""Training: configs, stage datasets, the loop (single process or torchrun DDP), MLflow logging.

Library API (used by tuning, in-process): ``load_config(name_or_path, **overrides) -> TrainConfig`` and
``train(cfg, epoch_callback=None) -> TrainResult``.

The loop's names are loaded on first use (PEP 562): importing :mod:`isc.train.config` -- which the registry,
the driver and the CLIs read for stage names and defaults -- must not pull in torch, timm and
pytorch-metric-learning through this package (``isc promote`` started 1.5 s slower when it did).
"""

from typing import Any

from isc.train.config import STAGES, TrainConfig, load_config, validate_config

_LOOP_NAMES = ("TrainingDivergedError", "TrainResult", "train")

__all__ = ["STAGES", "TrainConfig", "TrainResult", "TrainingDivergedError", "load_config", "train",
           "validate_config"]


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from isc.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
