"""``python -m entrypoints.X`` support: the same error handling as the ``isc`` command."""

from __future__ import annotations

import sys

from entrypoints.cli import run_entrypoint


def cli(module: str) -> None:
    sys.exit(run_entrypoint(module, sys.argv[1:]))
