"""``isc extract`` / MLproject ``extract``: query/reference/training descriptors of a DISC21 folder.

``--model`` is a checkpoint path, a run id, a ``runs:/`` or ``models:/`` URI (aliases included). Writes
``OUTPUT_DIR/descriptors.h5`` (q and/or r) and ``OUTPUT_DIR/train_descriptors.h5`` (t), streamed batch by
batch, and logs them as ``descriptors/...`` artifacts of the run (tags ``isc.step=extract``,
``isc.model_ref``). See ``docs/descriptors.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from isc import tracking
from isc.cliutil import Parser, nonnegative_int, positive_int, str2bool
from isc.contract import ARTIFACT_DESCRIPTORS, Step, Tag, parse_bool, stored_model_ref
from isc.data.disc21 import DISC21
from isc.errors import ConfigError
from isc.extract.describe import resolve_device, resolve_input_size
from isc.extract.sharded import DEFAULT_SHARD_SIZE, extract_descriptors_sharded
from isc.extract.streamed import ExtractRequest, check_outputs, extract_descriptors, parse_sets
from isc.fileutil import atomic_path
from isc.limits import check_input_size, check_workers
from isc.lineage import log_disc21_inputs, upstream_params
from isc.train import distributed as ddp

log = logging.getLogger(__name__)

BAD_IMAGES_FILE = "bad_images.txt"  # path<TAB>reason per skipped image
# Under torchrun, ranks that finish their shards early wait for the slowest rank and then for rank 0's
# merge (minutes at 2M images): NCCL's default 10-minute collective timeout would kill such a job.
COLLECTIVE_TIMEOUT_S = 4 * 3600


def build_parser() -> Parser:
    p = Parser(prog="isc extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint path, run id, runs:/ or models:/ URI")
    p.add_argument("--data", default="data/mini", help="DISC21-shaped root folder")
    p.add_argument("--sets", default="qrt", help="any of q (queries), r (references), t (training)")
    p.add_argument("--input-size", type=nonnegative_int, default=0,
                   help="square side in px; 0 = a registered version's setting, else the training size")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=nonnegative_int, default=2, help="DataLoader decoding processes")
    p.add_argument("--output-dir", default="outputs/extract")
    p.add_argument(
        "--skip-bad-images",
        type=str2bool,
        default=False,
        help="skip (and list) unreadable images instead of failing",
    )
    p.add_argument(
        "--tta",
        type=optional_bool,
        nargs="?",
        const=True,
        default=None,
        help="test-time augmentation: flip + rescales, summed; empty = a registered version's setting, else off",
    )
    p.add_argument("--limit", type=nonnegative_int, default=0, help="first N images of each set (0 = all)")
    p.add_argument("--device", default="", help="cuda, cuda:1, cpu; empty = CUDA when available")
    p.add_argument(
        "--overwrite",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="replace existing output files (default: refuse, naming the file)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=DEFAULT_SHARD_SIZE,
        help="under torchrun: images per shard (the unit of work and of resuming)",
    )
    return p


def optional_bool(text: str) -> bool | None:
    """``""``/``auto`` -> None (the registered setting), else a boolean."""
    if str(text).strip().lower() in ("", "auto"):
        return None
    try:
        return parse_bool(text)
    except ValueError as exc:

        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_ranks(device_arg: str) -> tuple[ddp.DistInfo, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, NCCL on CUDA), one GPU per
    local rank; otherwise a one-process DistInfo. The device is checked first so that ``--device cuda``
    on a machine without a GPU is a clean ``device`` error, never a traceback from ``set_device``."""
    device = resolve_device(device_arg or None)
    if ddp.world_size_from_env() <= 1:
        return ddp.DistInfo(device=device), device
    if device.type == "cuda" and device_arg and device.index is not None:
        raise ConfigError(
            "device", f"under torchrun give cuda or cpu (each rank takes cuda:LOCAL_RANK), not {device_arg}"
        )
    info = ddp.setup(device.type, timeout_s=COLLECTIVE_TIMEOUT_S)
    return info, info.device


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    letters = parse_sets(args.sets)
    check_workers(args.workers)
    if args.input_size:  # 0 = the model's own size
        check_input_size(args.input_size)
    data = DISC21(args.data)
    if not data.root.is_dir():
        raise ConfigError("data", f"{data.root} is not a folder")
    data.validate("".join(letters))
    output_dir = Path(args.output_dir).expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError("output_dir", f"{output_dir} exists and is not a folder")
    model_file = Path(args.model).expanduser()
    check_outputs(output_dir, letters, args.overwrite, [model_file] if model_file.is_file() else [])
    info, device = _setup_ranks(args.device)
    try:
        return _run(args, letters, data, output_dir, info, device)
    finally:
        ddp.teardown(info)


def _run(args, letters: list[str], data: DISC21, output_dir: Path, info: ddp.DistInfo, device) -> int:
    from isc.models import load_model
    from isc.settings import resolve, served_settings

    model = load_model(args.model, device=device)
    # A registered version serves with the settings chosen on val (its pyfunc's model_config); flags override.
    settings, source = resolve(model, served_settings(model.checkpoint_path), args.input_size or None, args.tta)
    input_size = resolve_input_size(model, settings.input_size)
    request = ExtractRequest(
        sets="".join(letters),
        out_dir=output_dir,
        input_size=input_size,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
        limit=args.limit or None,
        tta=settings.tta,
        model_ref=stored_model_ref(args.model),
        overwrite=args.overwrite,
    )
    if not info.primary:  # other ranks only extract their shards; rank 0 tracks, merges and reports
        extract_descriptors_sharded(model, data, request, info, shard_size=args.shard_size)
        return 0

    with tracking.tracked_run(
        run_name="extract", tags={Tag.STEP: Step.EXTRACT, Tag.MODEL_REF: str(args.model)}
    ):
        _log_params(args, letters, data, output_dir, info, device, input_size, settings, source)
        if info.distributed:
            tracking.log_params({"shard_size": args.shard_size})
            out = extract_descriptors_sharded(model, data, request, info, shard_size=args.shard_size)
        else:
            out = extract_descriptors(model, data, device=device, **dataclasses.asdict(request))
        _log_outputs(out, output_dir)
    counts = ", ".join(f"{n} {name}" for name, n in out["counts"].items())
    ranks = f" on {info.world_size} ranks" if info.distributed else ""
    print(
        f"extracted {counts} descriptors ({out['images_per_second']:.1f} images/s{ranks}) at {settings.label} "
        f"({source}) into {output_dir}"
    )
    if out["bad_images"]:
        print(
            f"warning: skipped {len(out['bad_images'])} unreadable image(s), listed in descriptors/bad_images.txt"
        )
    return 0


def _log_params(args, letters: list[str], data: DISC21, output_dir: Path, info: ddp.DistInfo, device,
                input_size: int, settings, source: str) -> None:  # fmt: skip
    """The run's parameters: the flags as given, the settings they resolved to, the data and the model's
    upstream runs (lineage)."""

    tracking.log_params(
        {
            "model": args.model,
            "data": str(data.root),
            "sets": "".join(letters),
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "output_dir": str(output_dir),
            "skip_bad_images": str(args.skip_bad_images).lower(),
            "tta": "" if args.tta is None else str(args.tta).lower(),
            "limit": args.limit,
            "overwrite": str(args.overwrite).lower(),
        }
    )
    tracking.log_params(
        {"resolved_input_size": input_size, "resolved_tta": str(settings.tta).lower(), "settings_source": source,
         "device": str(device), "world_size": info.world_size}
    )
    log_disc21_inputs(data.root, "".join(letters))
    tracking.log_params(upstream_params(str(args.model)))


def _log_outputs(out: dict, output_dir: Path) -> None:
    """Counts and speed as metrics, the descriptor files (and the list of skipped images) as artifacts."""
    metrics = {f"n_{name}": n for name, n in out["counts"].items()}
    metrics |= {
        "n_bad_images": len(out["bad_images"]),
        "images_per_second": out["images_per_second"],
        "extract_seconds": out["seconds"],
    }
    tracking.log_metrics(metrics)
    for key in ("descriptors", "train_descriptors"):
        if out[key]:
            tracking.log_artifact(out[key], ARTIFACT_DESCRIPTORS)
    listing = output_dir / BAD_IMAGES_FILE
    if out["bad_images"]:
        with atomic_path(listing) as tmp:
            tmp.write_text("".join(f"{p}\t{reason}\n" for p, reason in out["bad_images"]))
        tracking.log_artifact(listing, ARTIFACT_DESCRIPTORS)
    else:
        listing.unlink(missing_ok=True)  # a stale list from an earlier run would mislead

if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.extract")
