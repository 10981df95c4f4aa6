"""The registered descriptor model, as an MLflow *models-from-code* pyfunc definition.

MLflow stores this file itself (not a pickle of an object) inside every logged model and executes it
at load time; the last line, ``mlflow.models.set_model(...)``, tells MLflow which object serves
``predict``. Why models-from-code: no CloudPickle of live objects (a security and portability hazard),
and the inference contract is readable source next to the weights.

Artifacts of a logged version (see :mod:`registry.model_logging`):

* ``checkpoint`` -> ``artifacts/checkpoint.pth.tar``: an isc checkpoint (plain dict of tensors and
  builtins, read with ``torch.load(weights_only=True)``; nothing is unpickled);
* ``bank`` (optional) -> ``artifacts/nes_bank.h5``: the DBA-smoothed training descriptors
  (datasets ``train`` [nt, 256] float32, ``train_ids``) used by negative embedding subtraction.

``model_config`` (MLflow's per-model config dict): ``input_size`` and ``tta`` (the extraction settings the
version was evaluated with, chosen on val: :mod:`isc.settings`), ``nes_k``, ``nes_beta``, ``nes_num_iter`` (the
post-processing constants the version was evaluated with), ``batch_size`` for image inputs.

predict(model_input, params={"postprocess": bool}) accepts a batch as

* a pandas DataFrame with a string column ``path`` (image files), or a list/1-D array of paths;
* a pandas DataFrame with a column ``image``: each cell the bytes of an encoded image file (JPEG, PNG...),
  as a base64 string (what ``mlflow models serve`` hands over from a JSON request) or as raw ``bytes``.
  They are decoded in memory and resized/normalised by the same code as the files of ``path``, so the
  bytes of a file and the file get the same descriptor;
* a float32 array/tensor [N, 3, H, W], already resized and normalised with the checkpoint's
  ``model_config['mean'/'std']``: the network alone, one pass (no TTA: the caller chose the pixels);

and returns float32 descriptors [N, 256], L2-normalised. When the version carries a bank and
``postprocess`` is true (the default), the rows are the negatively-subtracted descriptors, i.e. the ones
the version's µAP was measured with. Queries and references must be described the same way.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from typing import Any

import mlflow
import numpy as np

from isc.contract import NES_BETA, NES_K, NES_NUM_ITER
from isc.errors import ISCError

# Set to "true" by MLflow's scoring server (mlflow.environment_variables._MLFLOW_IS_IN_SERVING_ENVIRONMENT).
_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"


class DescriptorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: images (paths, encoded bytes or tensors) -> [N, 256] float32 unit-norm descriptors."""

    def load_context(self, context: Any) -> None:
        import torch

        from isc.models import load_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(context.artifacts["checkpoint"], self.device)
        config = dict(context.model_config or {})
        self.input_size = int(config.get("input_size") or self.model.model_config.get("input_size", 256))
        self.tta = bool(config.get("tta", False))  # images are described as the version was evaluated
        self.batch_size = int(config.get("batch_size", 64))
        self.nes = {
            "k": int(config.get("nes_k", NES_K)),
            "beta": float(config.get("nes_beta", NES_BETA)),
            "num_iter": int(config.get("nes_num_iter", NES_NUM_ITER)),
        }
        self.bank: np.ndarray | None = None
        self._bank_index = None
        bank_path = (context.artifacts or {}).get("bank")
        if bank_path:
            from isc.io import read_train_descriptors
            from isc.postprocess import bank_index

            self.bank, _ = read_train_descriptors(bank_path)
            self._bank_index = bank_index(self.bank)  # built once, reused by every predict call

    # -- input handling ---------------------------------------------------------------------------
    def _describe_paths(self, paths: list[str]) -> np.ndarray:
        from isc.extract.describe import describe_images

        return np.asarray(
            describe_images(self.model, paths, input_size=self.input_size, batch_size=self.batch_size, tta=self.tta),
            dtype=np.float32,
        )

    def _describe_encoded(self, cells: list[Any]) -> np.ndarray:
        from isc.extract.describe import describe_encoded_images

        blobs = []
        for i, cell in enumerate(cells):
            if isinstance(cell, (bytes, bytearray)):
                blobs.append(bytes(cell))
            elif isinstance(cell, str):
                try:
                    blobs.append(base64.b64decode(cell, validate=True))
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"image[{i}]: not base64-encoded image bytes ({exc})") from exc
            else:
                raise TypeError(f"image[{i}]: expected a base64 string or bytes, got {type(cell).__name__}")
        return np.asarray(
            describe_encoded_images(self.model, blobs, input_size=self.input_size, batch_size=self.batch_size,
                                    tta=self.tta),
            dtype=np.float32,
        )

    def _describe_tensor(self, batch: Any) -> np.ndarray:
        import torch

        from isc.extract.describe import describe_tensors

        x = torch.as_tensor(batch)
        if x.dtype != torch.float32:
            raise TypeError(f"image tensors must be float32 (resized and normalised), got {x.dtype}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must have shape (N, 3, H, W), got {tuple(x.shape)}")
        dim = int(self.model.model_config.get("dim", 256))
        blocks = [describe_tensors(self.model, x[s : s + self.batch_size]) for s in range(0, x.shape[0], self.batch_size)]
        return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, dim), dtype=np.float32)

    def describe(self, model_input: Any) -> np.ndarray:
        """Raw descriptors [N, D] for any accepted input form (no post-processing)."""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            columns = [c for c in ("path", "image") if c in model_input.columns]
            if len(columns) != 1:
                raise ValueError("a DataFrame input needs a 'path' column (image files) or an 'image' column "
                                 f"(base64 image bytes), one of them; got columns {list(model_input.columns)}")
            if columns[0] == "image":
                return self._describe_encoded(model_input["image"].tolist())
            return self._describe_paths([str(p) for p in model_input["path"].tolist()])
        if isinstance(model_input, pd.Series):
            return self._describe_paths([str(p) for p in model_input.tolist()])
        if isinstance(model_input, (list, tuple)):
            if not all(isinstance(p, str) for p in model_input):
                raise TypeError("a list input must hold image file paths (str)")
            return self._describe_paths(list(model_input))
        if isinstance(model_input, np.ndarray) and model_input.dtype.kind in ("U", "S", "O"):
            return self._describe_paths([p.decode() if isinstance(p, bytes) else str(p) for p in model_input.ravel()])
        return self._describe_tensor(model_input)

    def predict(self, context, model_input, params=None):  # untyped on purpose: type hints make MLflow infer an input schema
        """[N, 256] float32 descriptors; see the module doc for the accepted inputs.

        Under ``mlflow models serve`` a failure becomes an ``MlflowException`` without a stack trace: the
        scoring server otherwise answers every HTTP 400 with the full traceback and server-side paths.
        The traceback goes to the server's log instead. In-process callers get the original exception.
        """
        if os.environ.get(_SERVING_ENV) != "true":
            return self._predict(model_input, params)
        try:
            return self._predict(model_input, params)
        except Exception as exc:  # noqa: BLE001 -- every failure of a request, answered without a traceback
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR

            logging.getLogger(__name__).exception("predict failed")

            if isinstance(exc, ISCError | ValueError | TypeError | KeyError):
                raise MlflowException(f"{type(exc).__name__}: {exc}", error_code=BAD_REQUEST) from None
            raise MlflowException("the model failed on this request (details in the server log)",
                                  error_code=INTERNAL_ERROR) from None

    def _predict(self, model_input, params=None):
        x = self.describe(model_input)
        postprocess = bool((params or {}).get("postprocess", True))
        if postprocess and self.bank is not None and x.shape[0] > 0:
            from isc.postprocess import negative_embedding_subtraction

            x = negative_embedding_subtraction(
                x, self._bank_index, k=self.nes["k"], beta=self.nes["beta"], num_iter=self.nes["num_iter"]
            )
        return np.ascontiguousarray(x, dtype=np.float32)


mlflow.models.set_model(DescriptorModel())
