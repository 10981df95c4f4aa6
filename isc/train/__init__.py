"""Training: configs, stage datasets, the loop (single process or torchrun DDP), MLflow logging.

Library API (used by tuning, in-process): ``load_config(name_or_path, **overrides) -> TrainConfig`` and
``train(cfg, epoch_callback=None) -> TrainResult``.
"""

from isc.train.config import STAGES, TrainConfig, load_config, validate_config
from isc.train.loop import TrainingDivergedError, TrainResult, train

__all__ = ["STAGES", "TrainConfig", "TrainResult", "TrainingDivergedError", "load_config", "train",
           "validate_config"]
