"""Export a (registered) descriptor model as one standalone TorchScript or ONNX file (``isc export``).

What the file holds: the network alone -- ISCNet, backbone -> GeM -> Linear -> BatchNorm -> L2 normalise --
taking float32 images ``[N, 3, S, S]`` (RGB, resized to S = the model's input size, scaled to [0, 1] and
normalised with its mean/std) and returning float32 unit descriptors ``[N, 256]``. The batch dimension is
free; the side is fixed at S, because tracing records the padding that TF-style "same" convolutions
(``tf_efficientnet*`` backbones) compute for the traced size. Runs on CPU; TorchScript can be moved to a
GPU with ``.to("cuda")``.

What it does not hold, and where it is: decoding and resizing (described in the JSON sidecar), and negative
embedding subtraction, which needs the training bank: when the version carries one it is copied next to
the file with its NES constants in the sidecar, so the pyfunc's output can be reproduced without MLflow
(``isc.postprocess.negative_embedding_subtraction(x, bank, k, beta, num_iter)``).

Files written, all or none (``isc.fileutil.atomic_path``), an existing one only with ``overwrite``:

    OUTPUT                 the model (``.pt`` TorchScript / ``.onnx`` ONNX, weights inside)
    OUTPUT.json            sidecar: input/output contract, preprocessing, NES, provenance, self-check
    OUTPUT.nes_bank.h5     the version's DBA'd bank (``train``/``train_ids``), when it has one

Every export is checked before it is kept: the file is loaded back (``torch.jit.load`` / onnxruntime)
and must reproduce the eager model's descriptors on a test batch to :data:`CHECK_TOLERANCE`; the
difference is recorded in the sidecar. For a registered version (``models:/name@alias`` or
``models:/name/N``) the file and its sidecar are also logged to the version's source run under
``export/<format>/`` and the version gets the tag ``isc.export.<format>`` = that artifact's URI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isc.contract import PYFUNC_BANK, Tag
from isc.errors import ConfigError, ISCError
from isc.fileutil import atomic_path, check_outputs, copy_file, sha256_of, write_bytes
from registry.writes import RegistryWriter

log = logging.getLogger(__name__)

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
CHECK_TOLERANCE = 1e-4  # max |exported - eager| on unit-norm descriptors, else the export is refused
EXPORT_TAG_PREFIX = Tag.EXPORT_PREFIX
ARTIFACT_DIR = "export"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportCheckError(ISCError):
    """The exported file does not reproduce the eager model's descriptors; nothing was written."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote (and logged)."""

    format: str
    output: Path
    sidecar: Path
    bank: Path | None
    model: dict[str, str]
    max_abs_diff: float
    seconds: float
    artifact_uri: str | None = None
    tag: str | None = None
    files: list[Path] = field(default_factory=list)


def default_output(fmt: str, model_name: str = "isc-descriptor") -> str:
    return f"outputs/export/{model_name}{FORMATS[check_format(fmt)]}"


def check_format(fmt: str) -> str:
    """``fmt`` lower-cased if it is a supported format, else ``ConfigError('format')``."""
    value = str(fmt or "").strip().lower()
    if value not in FORMATS:
        raise ConfigError("format", f"must be one of {', '.join(FORMATS)}; got '{fmt}'")
    if value == "onnx":

        missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("format", f"onnx export needs the packages {', '.join(missing)} "
                                        "(pyproject dependencies: `pip install -e .`)")
    return value


def sidecar_paths(output: Path) -> tuple[Path, Path]:
    """``(OUTPUT.json, OUTPUT.nes_bank.h5)``."""
    return output.with_name(output.name + ".json"), output.with_name(output.name + ".nes_bank.h5")


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Absolute output path; refuse a folder, and any existing output file unless ``overwrite``."""
    if not str(output or "").strip():
        raise ConfigError("output", "empty path")
    path = Path(output).expanduser().resolve()
    if path.is_dir():
        raise ConfigError("output", f"{path} is a folder; give a file path (e.g. {path / 'isc-descriptor.pt'})")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError("output", f"{path.parent} is a file, not a folder")
    sidecar, bank = sidecar_paths(path)
    check_outputs({"--output": path, "its sidecar": sidecar, "its bank copy": bank}, {}, overwrite)
    return path


# ------------------------------------------------------------------------------------------ model


def _model_files(model_uri: str, dst: Path) -> tuple[dict[str, str], Path, Path | None, dict[str, Any]]:
    """``(identity, checkpoint, bank or None, pyfunc model_config)`` of ``model_uri``, downloaded to ``dst``.

    Any reference ``isc extract`` takes works (a checkpoint file, a run id, ``runs:/``, ``models:/``); only a
    pyfunc folder (registry version, logged model) brings a bank and NES constants.
    """
    from isc.models import resolve_checkpoint
    from registry.image_search import model_identity

    ident = model_identity(model_uri)
    ckpt = resolve_checkpoint(ident["resolved_uri"], dst=dst)
    bank = ckpt.parent / PYFUNC_BANK  # beside the pyfunc's checkpoint.pth.tar
    config: dict[str, Any] = {}
    mlmodel = ckpt.parent.parent / "MLmodel"
    if ckpt.parent.name == "artifacts" and mlmodel.is_file():
        from mlflow.models import Model

        config = dict(Model.load(str(mlmodel)).flavors.get("python_function", {}).get("config") or {})
    return ident, ckpt, (bank if config and bank.is_file() else None), config


def _check_batch(size: int, n: int = 3) -> Any:
    """A fixed, normalised-looking test batch: standard normal pixels, seed 0."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen)


def _export_torchscript(model: Any, example: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        # torch 2.14 marks torch.jit deprecated (FutureWarning) but still ships and loads it; the tracer's
        # warnings are about shape-dependent Python values, i.e. why the side is fixed (module doc).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        # Saved into memory, written by Python: torch's own file writer does not see a failed write (full disk,
        # quota) and aborts the process from a destructor (c10::Error "unexpected pos", exit 134).
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    write_bytes(path, buffer.getvalue())


def _run_torchscript(path: Path, x: Any) -> np.ndarray:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x).numpy()


def _export_onnx(model: Any, example: Any, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=["images"], output_names=["descriptors"],
            dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False,
        )  # fmt: skip
    # serialised in memory (weights inside), written by Python: a full disk is an OSError naming the file
    write_bytes(path, program.model_proto.SerializeToString())


def _run_onnx(path: Path, x: Any) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _onnx_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _sidecar(fmt: str, output: Path, model: Any, ident: dict[str, str], config: dict[str, Any],
             bank: Path | None, diff: float, model_file: Path) -> dict[str, Any]:
    import torch

    cfg = model.model_config
    size, dim = int(cfg["input_size"]), int(cfg.get("dim", 256))
    nes = {"k": int(config.get("nes_k", 10)), "beta": float(config.get("nes_beta", 0.35)),
           "num_iter": int(config.get("nes_num_iter", 1))}
    out: dict[str, Any] = {
        "format": fmt,
        "file": output.name,
        "sha256": sha256_of(model_file),
        "model": {k: v for k, v in ident.items() if k in ("uri", "resolved_uri", "name", "version", "model_id")},
        "backbone": cfg.get("backbone"),
        "input": {
            "name": "images", "dtype": "float32", "shape": [-1, 3, size, size], "layout": "NCHW, RGB",
            "preprocessing": [
                "decode; apply the EXIF orientation; convert to RGB (alpha composited on white)",
                f"resize to {size} x {size} (aspect ratio not kept), PIL bilinear",
                "scale to [0, 1] (pixel / 255)",
                "normalise per channel: (x - mean) / std",
            ],
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "note": f"the batch size is free; the side must be {size} (fixed when the model was traced)",
        },
        "output": {"name": "descriptors", "dtype": "float32", "shape": [-1, dim], "l2_normalised": True,
                   "similarity": "inner product (cosine); squared L2 = 2 - 2 x inner product"},
        "negative_embedding_subtraction": {
            "included_in_model": False,
            "bank": bank.name if bank else None,
            **nes,
            "note": ("the registered model's descriptors are these after NES against the bank: x <- "
                     "normalise(x - beta * mean of the k nearest bank rows by inner product), num_iter times; "
                     "isc.postprocess.negative_embedding_subtraction(x, bank, k, beta, num_iter)")
            if bank else "this version has no bank: its descriptors are the network's output as they are",
        },
        # the registered version's extraction settings (chosen on val, isc.settings): the side above is its
        # input size; with TTA the pyfunc sums 6 passes, which a fixed-side traced network cannot run alone
        "registered_settings": {
            "input_size": size, "tta": bool(config.get("tta", False)),
            "note": ("the version describes images with TTA: the image resized to round(sqrt(2) x size), passes at "
                     "size/sqrt(2), size and sqrt(2) x size, each also flipped, summed and L2-normalised; this "
                     "file is the one pass at size") if config.get("tta") else "one pass at the input size",
        },
        "check": {"max_abs_diff_vs_eager": diff, "tolerance": CHECK_TOLERANCE, "batch": [3, 3, size, size]},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__},
    }
    if fmt == "onnx":
        import onnx
        import onnxruntime

        out["onnx_opset"] = _onnx_opset(model_file)
        out["versions"].update({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})
    return out


# ------------------------------------------------------------------------------------------ main


def export_model(
    model_uri: str,
    fmt: str,
    output: str | Path | None = None,
    overwrite: bool = False,
    log_artifacts: bool = True,
) -> ExportResult:
    """Export ``model_uri`` as ``fmt`` (``torchscript`` | ``onnx``) to ``output`` (+ sidecars); see module doc.

    Parameters are checked before anything is loaded or written. ``log_artifacts``: for a registered version,
    log the file + sidecar to its source run and tag the version (a no-op for other references).
    """
    from isc.models import load_model

    fmt = check_format(fmt)
    if not str(model_uri or "").strip():
        raise ConfigError("model", "empty model reference")
    output = check_output(output or default_output(fmt), overwrite)
    sidecar, bank_out = sidecar_paths(output)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="isc-export-") as tmp:
        ident, ckpt, bank, config = _model_files(model_uri, Path(tmp))
        # A local model given by path: never write over its own checkpoint or bank, --overwrite or not.
        check_outputs({"--output": output, "its sidecar": sidecar, "its bank copy": bank_out},
                      {"the model's checkpoint": ckpt, **({"the model's bank": bank} if bank else {})},
                      overwrite, param="output")
        model = load_model(ckpt, "cpu").eval()
        size = int(config.get("input_size") or model.model_config["input_size"])
        model.model_config["input_size"] = size
        x = _check_batch(size)
        import torch

        with torch.no_grad():
            eager = model(x).numpy()
        export, run = {"torchscript": (_export_torchscript, _run_torchscript),
                       "onnx": (_export_onnx, _run_onnx)}[fmt]
        with contextlib.ExitStack() as stack:  # every file renamed into place only when all succeeded
            tmp_model = stack.enter_context(atomic_path(output))
            export(model, _check_batch(size, 2), tmp_model)
            diff = float(np.abs(run(tmp_model, x) - eager).max())
            if not diff <= CHECK_TOLERANCE:
                raise ExportCheckError(f"the {fmt} export of {model_uri} differs from the eager model by {diff:.3g} "
                                       f"(> {CHECK_TOLERANCE}); nothing was written")
            info = _sidecar(fmt, output, model, ident, config, bank_out if bank else None, diff, tmp_model)
            tmp_sidecar = stack.enter_context(atomic_path(sidecar))
            write_bytes(tmp_sidecar, (json.dumps(info, indent=2) + "\n").encode())
            if bank is not None:
                copy_file(bank, stack.enter_context(atomic_path(bank_out)))
        if bank is None and bank_out.exists():  # overwrite: no stale bank beside a model that has none
            bank_out.unlink()
    result = ExportResult(fmt, output, sidecar, bank_out if bank else None, ident, diff, time.perf_counter() - t0,
                          files=[output, sidecar] + ([bank_out] if bank else []))
    if log_artifacts and ident.get("name") and ident.get("version"):
        try:
            result.artifact_uri, result.tag = log_export(ident["name"], ident["version"], fmt, output, sidecar)
        except Exception as exc:  # noqa: BLE001 -- MlflowException, OSError, network errors
            raise ISCError(f"exported to {output}, but logging it to {ident['resolved_uri']} failed ({exc}); "
                           "rerun with --overwrite, or --log-artifacts false to keep the files only") from exc
    log.info("exported %s as %s to %s in %.1f s (max |exported - eager| = %.2g)", ident["resolved_uri"], fmt,
             output, result.seconds, diff)
    return result


def log_export(name: str, version: str, fmt: str, output: Path, sidecar: Path) -> tuple[str | None, str | None]:
    """Log ``output`` + ``sidecar`` to the version's source run under ``export/<fmt>/``; tag the version.

    Returns ``(artifact URI, tag name)``, or ``(None, None)`` when the version has no source run.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        log.warning("%s version %s has no source run: the export is not logged to the registry", name, version)
        return None, None
    sub = f"{ARTIFACT_DIR}/{fmt}"
    for path in (output, sidecar):
        client.log_artifact(mv.run_id, str(path), sub)
    uri = f"runs:/{mv.run_id}/{sub}/{output.name}"
    tag = f"{EXPORT_TAG_PREFIX}{fmt}"
    RegistryWriter(client).set_version_tag(name, version, tag, uri)
    return uri, tag
