"""``isc settings`` / MLproject ``settings``: choose a model's extraction settings on the val split.

Scores the grid ``--sizes`` x ``--tta`` (input side in px, 0 = the training size; TTA off/on) by val µAP,
by successive halving (every size without TTA, then TTA at the ``--tta-sizes`` best of them), and records
the best on the run: tags ``isc.input_size`` / ``isc.tta``, params ``chosen_input_size`` / ``chosen_tta``
(and ``train_input_size``), one metric per scored setting (``val_uAP_<size>[_tta]``) and the table
``settings/grid.csv``. Prints the chosen setting as JSON on stdout. See :mod:`isc.settings`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from isc import tracking
from isc.cliutil import Parser, nonnegative_int, positive_int
from isc.contract import Step, Tag
from isc.data.disc21 import DISC21
from isc.errors import ConfigError
from isc.settings import (
    DEFAULT_SIZES,
    DEFAULT_TTA,
    DEFAULT_TTA_SIZES,
    choose,
    parse_sizes,
    parse_tta,
    score_grid,
)


def build_parser() -> Parser:
    p = Parser(prog="isc settings", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint path, run id, runs:/ or models:/ URI")
    p.add_argument("--data", default="data/mini", help="DISC21-shaped root folder")
    p.add_argument("--ground-truth", required=True, help="the val split's GT CSV (its queries are scored)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="input sides in px, comma-separated; 0 = training size")
    p.add_argument("--tta", default=DEFAULT_TTA, help="TTA values to try, comma-separated (false,true)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--tta-sizes", type=nonnegative_int, default=DEFAULT_TTA_SIZES,
                   help="TTA is tried only at this many sizes, the best without TTA (0 = at every size)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from isc.models import load_model

    data = DISC21(args.data)
    data.validate("qr")
    if not Path(args.ground_truth).is_file():
        raise ConfigError("ground_truth", f"{args.ground_truth} is not a file")
    ttas = parse_tta(args.tta)
    parse_sizes(args.sizes, 128)  # syntax checked before the model loads
    model = load_model(args.model, device="cpu")
    sizes = parse_sizes(args.sizes, int(model.model_config.get("input_size") or 0))
    with contextlib.redirect_stdout(sys.stderr), tracking.tracked_run(
        run_name="settings", tags={Tag.STEP: Step.SETTINGS, Tag.MODEL_REF: str(args.model)}
    ):
        tracking.log_params({"model": args.model, "data": str(data.root), "ground_truth": args.ground_truth,
                             "sizes": args.sizes, "tta": args.tta,
                             "tta_sizes": args.tta_sizes, "train_input_size": model.model_config.get("input_size"),
                             "grid": " ".join(
                                 f"{s}{'+tta' if t else ''}" for s in sizes for t in ttas)})  # before halving
        rows = score_grid(model, data, args.ground_truth, sizes, ttas, args.batch_size, args.tta_sizes)
        best = choose(rows)
        tracking.log_metrics({f"val_uAP_{r['settings'].key()}": r["average_precision"] for r in rows}
                             | {f"seconds_{r['settings'].key()}": r["seconds"] for r in rows})
        tracking.log_params({"chosen_input_size": best.input_size, "chosen_tta": str(best.tta).lower()})
        import mlflow

        mlflow.set_tags({Tag.INPUT_SIZE: str(best.input_size), Tag.TTA: str(best.tta).lower()})
        if mlflow.active_run() is not None:
            table = "input_size,tta,val_uAP,recall_p90,seconds\n" + "".join(
                f"{r['settings'].input_size},{str(r['settings'].tta).lower()},{r['average_precision']:.6f},"
                f"{r['recall_p90']:.6f},{r['seconds']:.1f}\n" for r in rows)
            mlflow.log_text(table, "settings/grid.csv")
    print(json.dumps({"chosen": best.to_dict(), "grid": [
        {**r["settings"].to_dict(), "val_uAP": r["average_precision"], "seconds": round(r["seconds"], 1)}
        for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.settings")
