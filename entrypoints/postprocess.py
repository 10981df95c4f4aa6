"""``isc postprocess`` / MLproject ``postprocess``: negative embedding subtraction on a descriptor h5.

Reads ``--descriptors`` (ISC21 query/reference h5) and ``--train-descriptors`` (``train``/``train_ids``
h5), each a local path, a run id (defaults to the extract step's ``descriptors/...`` artifact) or any
MLflow artifact URI. Writes ``--output`` (same ISC21 format) and ``nes_bank.h5`` (the DBA-smoothed bank,
``train``/``train_ids`` format) next to it, both atomically and only after every input was validated,
and logs both under the run's ``descriptors/`` artifact path.

Never destroys data silently: an output that is one of the inputs is always refused, and an existing
``--output`` or ``nes_bank.h5`` is replaced only with ``--overwrite true``. ``--k``/``--dba-k`` larger
than the number of training descriptors is refused (NES would average the whole bank, not k neighbours).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from isc import tracking
from isc.cliutil import Parser, nonnegative_float, nonnegative_int, positive_int, str2bool
from isc.contract import (
    ARTIFACT_DESCRIPTORS,
    DESCRIPTORS_FILE,
    NES_BANK_FILE,
    NES_DESCRIPTORS_FILE,
    TRAIN_DESCRIPTORS_FILE,
    Step,
    Tag,
)
from isc.errors import ConfigError, DescriptorFileError
from isc.fileutil import check_outputs
from isc.io import (
    Descriptors,
    read_descriptors,
    read_train_descriptors,
    write_descriptors,
    write_train_descriptors,
)
from isc.knn import knn_backend
from isc.postprocess import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BETA,
    DEFAULT_DBA_ALPHA,
    DEFAULT_DBA_K,
    DEFAULT_K,
    DEFAULT_NUM_ITER,
    NESConfig,
    postprocess_descriptors,
)

log = logging.getLogger(__name__)


def build_parser() -> Parser:
    p = Parser(prog="isc postprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--descriptors", required=True, help="query/reference h5: path, run id or artifact URI")
    p.add_argument(
        "--train-descriptors", required=True, help="training h5 (the negatives): path, run id or URI"
    )
    p.add_argument("--output", default="outputs/postprocess/descriptors_nes.h5", help="output h5 path")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output and the nes_bank.h5 next to it (default: refuse)")
    g = p.add_argument_group("constants (seed defaults)")
    g.add_argument("--k", type=positive_int, default=DEFAULT_K, help="bank neighbours subtracted per vector")
    g.add_argument("--beta", type=nonnegative_float, default=DEFAULT_BETA, help="subtraction weight")
    g.add_argument("--num-iter", type=nonnegative_int, default=DEFAULT_NUM_ITER, help="NES iterations")
    g.add_argument("--dba-k", type=nonnegative_int, default=DEFAULT_DBA_K, help="DBA neighbours (0 = no DBA)")
    g.add_argument(
        "--dba-alpha", type=nonnegative_float, default=DEFAULT_DBA_ALPHA, help="DBA weight exponent"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="rows per faiss search"
    )
    return p


def _resolve(ref: str, param: str, default_subpath: str) -> Path:
    try:
        return tracking.resolve_artifact(ref, default_subpath=default_subpath)
    except FileNotFoundError as exc:
        raise ConfigError(param, str(exc)) from exc


def load_inputs(
    descriptors_ref: str, train_ref: str
) -> tuple[Path, Descriptors, Path, np.ndarray, list[str]]:
    """Resolve and validate both inputs; raise an error naming the file on any format problem."""
    desc_path = _resolve(descriptors_ref, "descriptors", f"{ARTIFACT_DESCRIPTORS}/{DESCRIPTORS_FILE}")
    train_path = _resolve(train_ref, "train_descriptors", f"{ARTIFACT_DESCRIPTORS}/{TRAIN_DESCRIPTORS_FILE}")
    desc = read_descriptors(desc_path)
    train, train_ids = read_train_descriptors(train_path)
    if train.shape[1] != desc.dim:
        raise DescriptorFileError(
            train_path, f"training descriptors have dimension {train.shape[1]} but {desc_path} has {desc.dim}"
        )
    return desc_path, desc, train_path, train, train_ids


def _log_as(path: Path, name: str) -> None:
    """Log ``path`` as ``descriptors/<name>`` whatever its local file name is."""
    if path.name == name:
        tracking.log_artifact(path, ARTIFACT_DESCRIPTORS)
        return
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / name
        shutil.copyfile(path, staged)
        tracking.log_artifact(staged, ARTIFACT_DESCRIPTORS)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = NESConfig(args.k, args.beta, args.num_iter, args.dba_k, args.dba_alpha).validate()
    output = Path(args.output).expanduser().resolve()
    bank_path = output.parent / NES_BANK_FILE
    if output.name == NES_BANK_FILE:
        raise ConfigError(
            "output", f"'{NES_BANK_FILE}' is reserved for the smoothed bank written next to the output"
        )
    if output.is_dir():
        raise ConfigError("output", f"{output} is a directory; give a file path ending in .h5")
    desc_path, desc, train_path, train, train_ids = load_inputs(args.descriptors, args.train_descriptors)
    check_outputs(
        {"--output": output, f"{NES_BANK_FILE} next to --output": bank_path},
        {"--descriptors": desc_path, "--train-descriptors": train_path},
        args.overwrite,
    )
    cfg.check_bank(len(train_ids), train_path)

    with tracking.tracked_run(run_name="postprocess", tags={Tag.STEP: Step.POSTPROCESS}):
        tracking.log_params(
            {
                "descriptors": args.descriptors,
                "train_descriptors": args.train_descriptors,
                "output": str(output),
                "k": cfg.k,
                "beta": cfg.beta,
                "num_iter": cfg.num_iter,
                "dba_k": cfg.dba_k,
                "dba_alpha": cfg.dba_alpha,
                "batch_size": args.batch_size,
                "knn_backend": knn_backend(),  # the engine of the DBA / NES neighbour searches
            }
        )
        t0 = time.perf_counter()
        res = postprocess_descriptors(desc.query, desc.reference, train, cfg, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        write_train_descriptors(bank_path, res.bank, train_ids)
        write_descriptors(output, res.query, desc.query_ids, res.reference, desc.reference_ids)
        # How far the vectors moved: mean cosine between each row before and after subtraction.
        shift_q = float(np.mean(np.sum(res.query * desc.query, axis=1)))
        shift_r = float(np.mean(np.sum(res.reference * desc.reference, axis=1)))
        tracking.log_metrics(
            {
                "n_query": len(desc.query_ids),
                "n_reference": len(desc.reference_ids),
                "n_train": len(train_ids),
                "postprocess_seconds": seconds,
                "nes_query_cos_to_raw": shift_q,
                "nes_reference_cos_to_raw": shift_r,
            }
        )
        _log_as(output, NES_DESCRIPTORS_FILE)
        _log_as(bank_path, NES_BANK_FILE)
    print(
        f"wrote {output} ({len(desc.query_ids)} queries, {len(desc.reference_ids)} references) and {bank_path}"
    )
    log.info("post-processing took %.2f s (inputs %s, %s)", seconds, desc_path, train_path)
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.postprocess")
