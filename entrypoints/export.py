"""``isc export`` / MLproject ``export``: a registered model as one standalone TorchScript or ONNX file.

    isc export --model models:/isc-descriptor@champion --format torchscript --output outputs/export/isc.pt
    isc export --format onnx --output outputs/export/isc.onnx --overwrite

Writes OUTPUT, OUTPUT.json (input size, mean/std, preprocessing, NES constants, self-check) and, when the
version has one, OUTPUT.nes_bank.h5; logs the file to the version's source run (``export/<format>/``) and
tags the version ``isc.export.<format>``. See :mod:`registry.export` and docs/tuning_and_registry.md.
"""

from __future__ import annotations

import os

from isc.cliutil import Parser, optional_str, str2bool
from isc.contract import CHAMPION, DEFAULT_MODEL_NAME, Step, Tag, model_uri
from isc.tracking import log_metrics, log_params, tracked_run


def build_parser() -> Parser:
    p = Parser(prog="isc export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=model_uri(DEFAULT_MODEL_NAME, CHAMPION),
                   help="models:/name@alias or models:/name/version (also a checkpoint path, run id, runs:/...)")
    p.add_argument("--format", required=True, help="torchscript or onnx")
    p.add_argument("--output", type=optional_str, default=None,
                   help="file to write (default outputs/export/isc-descriptor.pt or .onnx)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace existing output files (default: refuse)")
    p.add_argument("--log-artifacts", type=str2bool, nargs="?", const=True, default=True,
                   help="log the file to the registered version's source run and tag the version (default true)")
    p.add_argument("--log-run", type=str2bool, nargs="?", const=True, default=False,
                   help="also record the export in an MLflow run of its own (always on under `mlflow run`)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from registry.export import check_format, check_output, default_output, export_model

    fmt = check_format(args.format)  # parameters first, before any run is opened
    output = check_output(args.output or default_output(fmt), args.overwrite)
    if os.environ.get("MLFLOW_RUN_ID") or args.log_run:
        with tracked_run(run_name="export", tags={Tag.STEP: Step.EXPORT}):
            result = export_model(args.model, fmt, output, args.overwrite, args.log_artifacts)
            log_params({"model": args.model, "resolved_model": result.model["resolved_uri"], "format": fmt,
                        "output": str(output), "exported_artifact": result.artifact_uri or ""})
            log_metrics({"export_max_abs_diff": result.max_abs_diff, "export_seconds": result.seconds})
    else:
        result = export_model(args.model, fmt, output, args.overwrite, args.log_artifacts)
    print(f"exported {result.model['resolved_uri']} as {fmt} to {result.output} "
          f"(+ {', '.join(p.name for p in result.files[1:])}); max |exported - eager| = {result.max_abs_diff:.2e}")
    if result.artifact_uri:
        print(f"logged as {result.artifact_uri} (version tag {result.tag})")
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.export")
