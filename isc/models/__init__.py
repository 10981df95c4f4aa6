"""Descriptor network (timm backbone + GeM + 256-d head), checkpoints, and loading models by reference."""

from isc.models.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from isc.models.gem import GeM, gem
from isc.models.iscnet import DEFAULT_BACKBONE, ISCNet, check_backbone, create_model, model_from_config

__all__ = [
    "DEFAULT_BACKBONE",
    "CheckpointError",
    "GeM",
    "ISCNet",
    "check_backbone",
    "checkpoint_name",
    "create_model",
    "gem",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "model_from_config",
    "resolve_checkpoint",
    "save_checkpoint",
]
