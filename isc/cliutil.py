"""argparse helpers shared by the entry points.

* every ``--dash-option`` is also accepted as ``--dash_option`` because ``mlflow run -P key=value``
  forwards undeclared parameters as ``--key value`` with the user's spelling;
* ``""`` means "not given" for optional strings (MLproject cannot express ``None``);
* numeric validators name the parameter in the error, before any work or MLflow run starts.
"""

from __future__ import annotations

import argparse
from typing import Any

from isc.contract import parse_bool


def _underscore_aliases(names: tuple[str, ...]) -> list[str]:
    """``--memory-size`` -> ``--memory_size`` (only long options that contain a dash)."""
    out = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
    return [o for o in out if o not in names]


class Parser(argparse.ArgumentParser):
    """ArgumentParser that adds an underscore alias to every long option."""

    def add_argument(self, *names: str, **kwargs: Any):  # type: ignore[override]
        extra = _underscore_aliases(names)
        return super().add_argument(*names, *extra, **kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        group = super().add_argument_group(*args, **kwargs)
        original = group.add_argument

        def add(*names: str, **kw: Any):
            extra = _underscore_aliases(names)
            return original(*names, *extra, **kw)

        group.add_argument = add  # type: ignore[method-assign]
        return group


def optional_str(text: str) -> str | None:
    return text if text not in ("", "None", "none", "null") else None


def str2bool(text: str | bool) -> bool:
    """argparse type for :func:`isc.contract.parse_bool` (the one set of accepted words)."""

    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _num(kind: type, cond, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got '{text}'") from exc
        if not cond(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _num(int, lambda v: v > 0, "> 0")
nonnegative_int = _num(int, lambda v: v >= 0, ">= 0")


def optional_nonnegative_int(text: str) -> int | None:
    """``""`` / ``None`` -> None (MLproject passes an unset string parameter as ""), else as :data:`nonnegative_int`."""
    return None if optional_str(text) is None else nonnegative_int(text)
positive_float = _num(float, lambda v: v > 0, "> 0")
nonnegative_float = _num(float, lambda v: v >= 0, ">= 0")
