"""``isc import-seed`` / MLproject ``import_seed``: the seed's own checkpoint as an isc model.

    isc import-seed v107/train/checkpoint_0009.pth.tar --output outputs/seed/v107.pth.tar
    isc import-seed v107.pth.tar --output outputs/seed/v107.pth.tar --register isc-seed-v107

Reads the seed's ``{epoch, arch, state_dict, optimizer, args}`` file with a restricted unpickler (tensors,
OrderedDict, the optimizer dict, ``argparse.Namespace``; anything else is refused, naming the global),
writes a weights-only isc checkpoint, and with ``--register NAME`` logs it as the descriptor pyfunc and
registers it as a new version of NAME. No alias is set or moved: ``@champion`` stays where it is until a
user compares and promotes explicitly (docs/descriptors.md, "Importing the seed's checkpoints").
"""

from __future__ import annotations

from pathlib import Path

from isc.cliutil import Parser, optional_str, positive_float, positive_int, str2bool
from isc.contract import Step, Tag, model_version_uri
from isc.tracking import log_params, tracked_run
from registry.model_logging import log_descriptor_model
from registry.writes import RegistryWriter


def _optional(kind):
    """``""`` = not given (MLproject cannot pass None), else ``kind`` (which names a bad value)."""

    def parse(text: str):
        return None if optional_str(text) is None else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> Parser:
    p = Parser(prog="isc import-seed", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the seed's .pth.tar (exp/vNN/train/checkpoint_NNNN.pth.tar or the published "
                                      "weights)")
    p.add_argument("--output", type=optional_str, default=None,
                   help="isc checkpoint to write (default outputs/seed/<checkpoint name>)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace an existing --output (default: refuse)")
    p.add_argument("--register", type=optional_str, default=None,
                   help="also register it as a new version of this registered model name (no alias is moved)")
    p.add_argument("--backbone", type=optional_str, default=None,
                   help="timm name (default: the checkpoint's arch, mapped to today's timm name)")
    p.add_argument("--input-size", type=_optional(positive_int), default=None, help="default: the seed's args.input_size")
    p.add_argument("--gem-p", type=_optional(positive_float), default=None, help="default: the seed's args.gem_p")
    p.add_argument("--gem-eval-p", type=_optional(positive_float), default=None,
                   help="GeM p at extraction (default: the trained p, args.gem_p, as the seed's extraction "
                        "command --gem-eval-p 1.0; the checkpoint's args.gem_eval_p is its training command's "
                        "unused parser default)")
    return p


def _default_output(checkpoint: str) -> str:
    name = Path(checkpoint).name
    stem = name[: -len(".pth.tar")] if name.endswith(".pth.tar") else Path(name).stem
    return str(Path("outputs") / "seed" / f"{stem}.pth.tar")


def register(result, name: str) -> tuple[str, str]:
    """Log ``result.output`` as the descriptor pyfunc in an ``import_seed`` run and register it under
    ``name``; returns (run id, version). The version's description says where the weights came from."""
    import mlflow
    from mlflow import MlflowClient


    with tracked_run(run_name=f"import-seed {result.source.name}", tags={Tag.STEP: Step.IMPORT_SEED}):
        cfg = result.model_config
        log_params({"source": result.source.name, "source_sha256": result.sha256,
                    "seed_arch": result.seed_arch or "", "seed_epoch": result.seed_epoch if result.seed_epoch
                    is not None else "", "backbone": cfg["backbone"], "input_size": cfg["input_size"],
                    "gem_p": cfg["gem_p"], "gem_eval_p": cfg["gem_eval_p"]})
        info = log_descriptor_model(result.output, registered_model_name=name)
        run_id = mlflow.active_run().info.run_id
    version = str(info.registered_model_version)
    RegistryWriter(MlflowClient()).set_version_description(
        name, version, f"Imported from the seed's checkpoint {result.source.name} (sha256 "
                                   f"{result.sha256[:16]}..., epoch {result.seed_epoch}) by isc import-seed; "
                                   f"not evaluated here, no alias set.")
    return run_id, version


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from isc.limits import check_input_size
    from isc.models.seed_import import import_seed_checkpoint

    if args.input_size is not None:
        check_input_size(args.input_size)

    output = args.output or _default_output(args.checkpoint)
    result = import_seed_checkpoint(args.checkpoint, output, overwrite=args.overwrite, backbone=args.backbone,
                                    input_size=args.input_size, gem_p=args.gem_p, gem_eval_p=args.gem_eval_p)
    cfg = result.model_config
    print(f"imported {result.source} (epoch {result.seed_epoch}, arch {result.seed_arch}) -> {result.output}: "
          f"{cfg['backbone']}, input {cfg['input_size']}, GeM p {cfg['gem_p']} / eval {cfg['gem_eval_p']}"
          + (f"; seed parser defaults used for {', '.join(result.defaults)}" if result.defaults else "")
          + (f"; its args.gem_eval_p {result.args_gem_eval_p} (the training command's) is not used, pass "
             f"--gem-eval-p to extract with it" if args.gem_eval_p is None and result.args_gem_eval_p is not None
             and result.args_gem_eval_p != cfg["gem_eval_p"] else ""))
    if args.register:
        run_id, version = register(result, args.register)
        print(f"registered {model_version_uri(args.register, version)} (run {run_id}); no alias moved -- compare it with "
              f"@champion, then promote it explicitly if wanted")
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.import_seed")
