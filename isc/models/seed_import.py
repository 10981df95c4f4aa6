"""Reading the seed's own checkpoints (its ``exp/v83.py`` ... ``v107.py`` files and published weights).

Why a separate reader: the seed saved ``{epoch, arch, state_dict, optimizer, args}`` with ``torch.save``,
``args`` being its ``argparse.Namespace``. :func:`isc.models.load_checkpoint` rightly refuses any pickled
object, so without this module a user could not compare a champion with the published model, start from
it or serve it. Loading a pickle can run code, so this reader only ever accepts a fixed set of globals:

* tensors and storages (the ``torch.*`` rebuild functions, storage classes, dtypes, ``torch.Size``, which
  ``torch.load(weights_only=True)`` itself allows -- torch checks them a second time),
* ``collections.OrderedDict`` (the state dicts) and ``argparse.Namespace`` (the seed's ``args``).

Two independent guards: the pickle stream is scanned (``pickletools``) and every global it names is
checked against that list *before* anything is unpickled, so the refusal names the global and the file;
then ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as its only extra safe global. An
explicit ``weights_only=True`` is not overridden by ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.

The seed's network (``ISCNet`` in its scripts) names its weights ``backbone.*`` (timm, ``features_only``),
``fc.weight`` (Linear C -> 256, no bias) and ``bn.*`` (BatchNorm1d); GeM's p is a plain attribute taken
from ``args.gem_p``. DDP saved every key with a ``module.`` prefix. That is this project's
:class:`isc.models.ISCNet` layout key for key, so the weights map one to one (strict).

GeM's eval p: a checkpoint's ``args`` are those of the *training* command, and the seed's training commands
never pass ``--gem-eval-p``: their ``args.gem_eval_p`` is the parser default 4.0, which the seed never
extracted with -- its extraction is a separate command (``v107.py --mode extract --gem-eval-p 1.0``). So the
eval p defaults to the trained p (``args.gem_p``, 1.0 in every final command), which reproduces the seed's
published descriptors; ``gem_eval_p=`` (``--gem-eval-p``) sets another.
"""

from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from isc.errors import ConfigError, ISCError
from isc.fileutil import atomic_path, sha256_of
from isc.models.checkpoint import strip_module_prefix
from isc.models.iscnet import check_backbone, create_model

# The seed's parser defaults (exp/v107.py), used only for an attribute its args do not carry.
SEED_DEFAULTS = {"gem_p": 3.0, "input_size": 224}
ALLOWED_GLOBALS = frozenset({"collections.OrderedDict", "argparse.Namespace"})
_GLOBAL_OPS = {"GLOBAL", "INST"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
               "STRING"}


class SeedImportError(ISCError):
    """A seed checkpoint that cannot be imported (unreadable, refused global, weights that do not fit)."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


def _allowed(name: str) -> bool:
    # torch.* names are then checked by torch's own weights_only allowlist (tensor/storage rebuilds only).
    return name in ALLOWED_GLOBALS or name.startswith("torch.")


def pickle_globals(stream: io.BytesIO) -> list[str]:
    """Every global (``module.name``) the next pickle in ``stream`` would import, in order, without
    unpickling it; ``stream`` is left just after that pickle's STOP.

    ``STACK_GLOBAL`` takes its two strings from the stack; they are followed through the memo. A global
    whose name cannot be followed is reported as ``<unresolved STACK_GLOBAL>`` (and therefore refused).
    """
    names: list[str] = []
    strings: list[str | None] = []  # the values most recently pushed, enough for STACK_GLOBAL
    memo: dict[int, str | None] = {}
    for op, arg, _pos in pickletools.genops(stream):
        if op.name in _GLOBAL_OPS:
            module, _, name = str(arg).partition(" ")
            names.append(f"{module}.{name}")
            strings.append(None)
        elif op.name == "STACK_GLOBAL":
            module, name = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
            names.append(f"{module}.{name}" if module is not None and name is not None
                         else "<unresolved STACK_GLOBAL>")
            strings.append(None)
        elif op.name in _STRING_OPS:
            strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            key = len(memo) if op.name == "MEMOIZE" else int(arg)
            memo[key] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(arg)))
        elif op.name not in ("PROTO", "FRAME"):
            strings.append(None)
        del strings[:-4]
    return names


def _pickled_records(path: Path) -> list[tuple[str, bytes, int]]:
    """(name, bytes, number of pickles) to scan: a ``torch.save`` zip archive's ``*.pkl`` (one pickle
    each); a legacy (pre-1.6, non-zip) file holds five pickles (magic, protocol, sys info, the object,
    the storage keys) before its raw storage bytes."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return [(n, zf.read(n), 1) for n in zf.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SeedImportError(path, f"cannot read the checkpoint archive: it is damaged or truncated ({exc})") \
                from exc
    return [(path.name, path.read_bytes(), 5)]


def check_globals(path: str | Path) -> list[str]:
    """Refuse ``path`` (naming the global) when its pickle would import anything outside the allowlist."""
    path = Path(path)
    seen: list[str] = []
    for record, data, count in _pickled_records(path):
        stream = io.BytesIO(data)
        try:
            names = [name for _ in range(count) for name in pickle_globals(stream)]
        except Exception as exc:  # noqa: BLE001 -- ValueError/EOFError/... from a torn or foreign stream
            raise SeedImportError(path, f"not a readable PyTorch checkpoint: the file is truncated or not "
                                        f"written by torch.save ({type(exc).__name__} in {record}: {exc})") from exc
        for name in names:
            if not _allowed(name):
                raise SeedImportError(path, f"refused: the pickle imports the global '{name}'; a seed checkpoint "
                                            f"may only hold tensors, OrderedDict, the optimizer dict and "
                                            f"argparse.Namespace (nothing was unpickled)")
        seen += names
    return sorted(set(seen))


def read_seed_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a seed checkpoint safely; ``args`` comes back as a plain dict (``{}`` when absent)."""
    path = Path(path)
    if not path.is_file():
        raise SeedImportError(path, "no such file")
    if path.stat().st_size == 0:
        raise SeedImportError(path, "empty file (truncated download?)")
    check_globals(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch's message: a generic first line, then "WeightsUnpickler error: <the reason>"
        reason = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln or "Can only" in ln),
                      lines[0] if lines else type(exc).__name__)
        m = re.search(r"GLOBAL (\S+)", reason)
        if m:
            raise SeedImportError(path, f"refused: it holds the global '{m.group(1)}' ({reason})") from exc
        raise SeedImportError(path, f"refused: torch's weights-only unpickler cannot read it safely ({reason}; "
                                    f"torch.save's default pickle protocol 2, which the seed used, is "
                                    f"supported)") from exc
    except Exception as exc:  # noqa: BLE001 -- RuntimeError (torn zip), EOFError, ...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SeedImportError(path, f"not a readable PyTorch checkpoint: the file is truncated or not written "
                                    f"by torch.save ({type(exc).__name__}: {text})") from exc
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise SeedImportError(path, f"not a seed checkpoint: expected a dict with 'state_dict', got {keys}")
    if "model_config" in ckpt:  # read as the seed's, its settings would become the seed parser's defaults
        raise SeedImportError(path, "already an isc checkpoint (it has model_config): use it as it is "
                                    "(--model, --init-checkpoint), there is nothing to import")
    bad = [k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SeedImportError(path, f"state_dict entries that are not tensors: {bad[:5]}")
    args = ckpt.get("args")
    out = dict(ckpt)
    out["args"] = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return out


def seed_backbone_name(arch: str) -> str:
    """Today's timm name for the seed's ``--arch`` (``tf_efficientnetv2_m_in21ft1k`` ->
    ``tf_efficientnetv2_m.in21k_ft_in1k``), so the backbone's pretrained cfg -- and with it the mean/std
    the seed normalised with -- is the one the seed had."""
    try:
        from timm.models import get_deprecated_models

        return str(get_deprecated_models().get(arch, arch) or arch)
    except ImportError:  # older/newer timm without the table: the name as given
        return arch


def _builtin(value: Any) -> Any:
    """A seed arg as a builtin (paths etc. become strings) so the output stays weights-only loadable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_builtin(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _builtin(v) for k, v in value.items()}
    return str(value)


def _load_exactly(source: Path, name: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` only when every key and shape matches (names what does not)."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise SeedImportError(source, f"its weights do not fit {name}: {len(missing)} missing {missing[:4]}, "
                                      f"{len(unexpected)} unexpected {unexpected[:4]}, shape mismatches "
                                      f"{shapes[:3]} (wrong --backbone?)")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in target.items()}, strict=True)


@dataclass
class SeedImport:
    """What :func:`import_seed_checkpoint` wrote and from what."""

    output: Path
    source: Path
    sha256: str
    model_config: dict[str, Any]
    seed_epoch: int | None
    seed_arch: str | None
    from_args: list[str] = field(default_factory=list)  # model_config keys read from the seed's args
    defaults: list[str] = field(default_factory=list)  # keys filled with the seed's parser defaults
    args_gem_eval_p: float | None = None  # the training command's args.gem_eval_p (not used: module doc)


def import_seed_checkpoint(
    source: str | Path,
    output: str | Path,
    overwrite: bool = False,
    backbone: str | None = None,
    input_size: int | None = None,
    gem_p: float | None = None,
    gem_eval_p: float | None = None,
) -> SeedImport:
    """Convert a seed checkpoint into a weights-only isc checkpoint at ``output``.

    Every model setting comes from, in order: the explicit argument, the seed's ``args`` (``arch``,
    ``gem_p``, ``input_size``), the checkpoint's ``arch``, the seed parser's default; ``gem_eval_p``
    from the argument, else the trained p (module doc: ``args.gem_eval_p`` is never what the seed
    extracted with).
    The weights must fit the rebuilt network exactly (strict), otherwise nothing is written.
    """
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise ConfigError("output", f"{output} exists; pass --overwrite to replace it")
    ckpt = read_seed_checkpoint(source)
    args = ckpt["args"]
    from_args, defaults = [], []

    def pick(key: str, given: Any) -> Any:
        if given is not None:
            return given
        if args.get(key) is not None:
            from_args.append(key)
            return args[key]
        defaults.append(key)
        return SEED_DEFAULTS[key]

    arch = backbone or args.get("arch") or ckpt.get("arch")
    if backbone is None and arch:
        from_args.append("arch")
    if not arch:
        raise SeedImportError(source, "names no architecture (no 'arch' key or args.arch); pass --backbone")
    state = strip_module_prefix(ckpt["state_dict"])
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise SeedImportError(source, "has no 'fc.weight' [dim, C] (not the seed's ISCNet layout)")
    name = seed_backbone_name(str(arch))
    try:
        check_backbone(name)
    except ConfigError as exc:
        raise SeedImportError(source, f"its architecture '{arch}' is unknown to this timm ({exc}); "
                                      f"pass --backbone") from exc
    train_p = float(pick("gem_p", gem_p))
    model = create_model(name, pretrained=False, gem_p=train_p,
                         gem_eval_p=float(gem_eval_p) if gem_eval_p is not None else train_p,
                         dim=int(fc.shape[0]), input_size=int(pick("input_size", input_size)))
    _load_exactly(source, name, model, state)
    digest = sha256_of(source)
    epoch = ckpt.get("epoch")
    out: dict[str, Any] = {
        "arch": name,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "model_config": dict(model.model_config),
        "epoch": int(epoch) if isinstance(epoch, int) else 0,
        "step": 0,
        "optimizer": None,  # weights only: the seed's SGD state is not carried over
        "scaler": None,
        "rng": None,
        "xbm": None,
        "train_config": None,
        "mlflow_run_id": None,
        "metrics": {},
        "imported_from": {"file": source.name, "sha256": digest, "seed_arch": _builtin(ckpt.get("arch")),
                          "seed_epoch": _builtin(epoch), "seed_args": _builtin(args)},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        torch.save(out, tmp)
    return SeedImport(output=output, source=source, sha256=digest, model_config=dict(model.model_config),
                      seed_epoch=int(epoch) if isinstance(epoch, int) else None,
                      seed_arch=str(ckpt.get("arch")) if ckpt.get("arch") else None,
                      from_args=from_args, defaults=defaults,
                      args_gem_eval_p=float(args["gem_eval_p"]) if args.get("gem_eval_p") is not None else None)
