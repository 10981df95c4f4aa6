"""``isc search`` / MLproject ``search``: top-k reference matches of query images with a registered model.

The model is an MLflow pyfunc, and loading a pyfunc runs the Python code it was saved with. Only this
project's descriptor models are loaded (a local folder must hold this checkout's own code); anything else
needs ``--trust-model-code true``.

    isc search --model models:/isc-descriptor@champion --references data/mini/reference_images \\
        --queries data/mini/query_images/Q00003.jpg other/folder --index outputs/search/reference.index \\
        --output outputs/search/matches.csv --topk 5
"""

from __future__ import annotations

import os

from isc.cliutil import Parser, optional_str, positive_int, str2bool
from isc.contract import CHAMPION, DEFAULT_MODEL_NAME, Step, Tag, model_uri
from isc.tracking import configure, log_artifact, log_params, tracked_run


def build_parser() -> Parser:
    p = Parser(prog="isc search", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--model", default=model_uri(DEFAULT_MODEL_NAME, CHAMPION),
                   help="model URI: models:/name@alias, models:/name/version, models:/m-<id>, runs:/...")
    p.add_argument("--references", nargs="+", required=True, help="reference image folder(s) and/or files")
    p.add_argument("--queries", nargs="+", required=True, help="query image folder(s) and/or files")
    p.add_argument("--index", default="outputs/search/reference.index",
                   help="faiss index path (ids and meta are saved next to it; reused when still valid)")
    p.add_argument("--output", type=optional_str, default="outputs/search/matches.csv",
                   help="matching-track CSV query_id,reference_id,score ('' = do not write)")
    p.add_argument("--topk", type=positive_int, default=5, help="matches per query")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output CSV (--index is only ever replaced when isc search wrote it)")
    p.add_argument("--trust-model-code", type=str2bool, nargs="?", const=True, default=False,
                   help="load a pyfunc that is not one of this project's descriptor models (a pyfunc runs the "
                        "code it was saved with: only for a model you trust)")
    p.add_argument("--log-run", type=str2bool, default=False, nargs="?", const=True,
                   help="also log the CSV to an MLflow run (always on under `mlflow run`)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import pandas as pd

    from isc.knn import knn_backend
    from registry.image_search import search_images

    configure(check=True)
    if os.environ.get("MLFLOW_RUN_ID") or args.log_run:
        with tracked_run(run_name="search", tags={Tag.STEP: Step.SEARCH}):
            result = search_images(args.model, args.references, args.queries, args.index, args.topk, args.output,
                                   args.overwrite, args.trust_model_code)
            log_params({"resolved_model": result.model["resolved_uri"], "index_reused": result.index_reused,
                        "knn_backend": knn_backend()})
            if args.output:
                log_artifact(args.output, "search")
    else:
        result = search_images(args.model, args.references, args.queries, args.index, args.topk, args.output,
                                   args.overwrite, args.trust_model_code)
    with pd.option_context("display.max_rows", 200, "display.width", 160):
        print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    where = f"; CSV: {args.output}" if args.output else ""
    print(f"model {result.model['resolved_uri']} ({'reused' if result.index_reused else 'built'} index "
          f"{args.index}){where}", flush=True)
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.search")
