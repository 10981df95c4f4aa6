"""Log (and optionally register) the descriptor pyfunc defined in :mod:`registry.descriptor_model`.

The logged model directory looks like::

    MLmodel                      flavour pyfunc, models-from-code, signature (see below)
    descriptor_model.py          the model code itself (models-from-code)
    code/isc/...                 the isc package as it was when the version was logged (code_paths)
    artifacts/checkpoint.pth.tar weights + model_config (torch.load(weights_only=True))
    artifacts/nes_bank.h5        optional DBA'd training descriptors for negative embedding subtraction

Signature, and how MLflow enforces it: the *input* schema is deliberately left empty because the
model takes three input forms (a DataFrame/list of image paths, a DataFrame of base64 image bytes in a
column ``image``, or a float32 [N, 3, H, W] tensor) that no single MLflow schema can describe; ``predict``
itself validates the input and names what is wrong. An empty input schema is also what lets
``mlflow models serve`` pass a JSON ``dataframe_split`` with the ``image`` column through untouched.
The *output* is declared as ``Tensor(float32, (-1, 256))`` and the *params* schema declares
``postprocess: boolean = True``: MLflow rejects unknown params or a non-boolean ``postprocess`` before
``predict`` runs, and fills in the default when it is not given.

Input example: one 8 x 8 PNG in the ``image`` column. MLflow stores it as ``input_example.json`` and
``serving_input_example.json`` (the exact JSON body ``/invocations`` takes) and, while logging, loads the
model once and predicts it as the server would -- a check that the version can be served.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from isc.contract import (
    DEFAULT_MODEL_NAME,  # noqa: F401 (re-exported)
    NES_BETA,
    NES_K,
    NES_NUM_ITER,
    PYFUNC_ARTIFACT_NAME,
    PYFUNC_BANK,
    PYFUNC_CHECKPOINT,
    Step,
    Tag,
)
from isc.errors import ConfigError
from isc.tracking import tracked_run

log = logging.getLogger(__name__)

MODEL_CODE_PATH = Path(__file__).resolve().parent / "descriptor_model.py"
ISC_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "isc"


def descriptor_signature(dim: int = 256) -> Any:
    """Output [N, dim] float32 tensor + the ``postprocess`` param; inputs checked by ``predict``."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
        params=ParamSchema([ParamSpec("postprocess", "boolean", True)]),
    )


def serving_input_example() -> Any:
    """A DataFrame with one tiny base64 PNG in column ``image``: the REST input form, cheap to predict."""

    import numpy as np
    import pandas as pd
    from PIL import Image

    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) * 3  # deterministic, not blank
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def _pip_requirements() -> list[str]:
    """Pinned runtime requirements of the pyfunc (explicit: inferring them would load the model)."""

    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "h5py", "pillow", "tqdm", "pyyaml"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    for faiss_dist in ("faiss-cpu", "faiss-gpu", "faiss"):
        try:
            reqs.append(f"{faiss_dist}=={metadata.version(faiss_dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_descriptor_model(
    checkpoint: str | Path,
    bank: str | Path | None = None,
    nes_params: Mapping[str, Any] | None = None,
    name: str = PYFUNC_ARTIFACT_NAME,
    registered_model_name: str | None = None,
    batch_size: int = 64,
    include_code: bool = True,
    input_example: bool = True,
    settings: Any = None,
) -> Any:
    """Log the pyfunc for ``checkpoint`` (+ optional NES ``bank``); returns MLflow's ``ModelInfo``.

    checkpoint: local isc checkpoint file (copied as ``artifacts/checkpoint.pth.tar``).
    bank: local h5 with ``train``/``train_ids`` (copied as ``artifacts/nes_bank.h5``).
    nes_params: ``{"k", "beta", "num_iter"}`` the version was evaluated with (seed defaults otherwise).
    registered_model_name: also register the logged model as a new version of that name.
    input_example: store :func:`serving_input_example` (MLflow then test-serves it once while logging).
    settings: the :class:`isc.settings.ExtractionSettings` it was evaluated with (chosen on val); None = the
    checkpoint's training size, no TTA. The pyfunc, ``isc extract``, ``isc search`` and the exports use them.
    Logs into the active run when there is one (MLflow 3 stores the files under the run's LoggedModel).
    """
    import mlflow

    from isc.models import load_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)  # weights_only: refuses pickled objects before anything is logged
    model_config = dict(ckpt.get("model_config") or {})
    if not model_config:
        raise ConfigError("checkpoint", f"{checkpoint} has no model_config; cannot package it")
    nes = dict(nes_params or {})
    config: dict[str, Any] = {
        "input_size": int(settings.input_size if settings else model_config.get("input_size", 256)),
        "tta": bool(settings.tta) if settings else False,
        "batch_size": int(batch_size),
        "nes_k": int(nes.get("k", NES_K)),
        "nes_beta": float(nes.get("beta", NES_BETA)),
        "nes_num_iter": int(nes.get("num_iter", NES_NUM_ITER)),
        "has_bank": bank is not None,
    }
    with tempfile.TemporaryDirectory(prefix="isc-pyfunc-") as tmp:
        artifacts = {"checkpoint": str(shutil.copyfile(checkpoint, Path(tmp) / PYFUNC_CHECKPOINT))}
        if bank is not None:
            bank = Path(bank)
            from isc.io import read_train_descriptors

            read_train_descriptors(bank)  # validate before packaging
            artifacts["bank"] = str(shutil.copyfile(bank, Path(tmp) / PYFUNC_BANK))
        code_paths = [str(ISC_PACKAGE_DIR)] if include_code else None
        with contextlib.ExitStack() as stack:
            # Deliberate choices (see module doc): no input schema, untyped predict.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
            if mlflow.active_run() is None:  # never fall back to MLflow's CWD-relative ./mlruns

                stack.enter_context(tracked_run(run_name="log-descriptor-model", tags={Tag.STEP: Step.PACKAGE}))
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE_PATH),
                artifacts=artifacts,
                model_config=config,
                signature=descriptor_signature(int(model_config.get("dim", 256))),
                input_example=serving_input_example() if input_example else None,
                pip_requirements=_pip_requirements(),
                code_paths=code_paths,
                registered_model_name=registered_model_name,
            )
    log.info("logged descriptor pyfunc %s (bank: %s)", info.model_uri, bank is not None)
    return info
