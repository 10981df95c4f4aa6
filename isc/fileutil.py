"""Atomic file output: a reader never sees a half-written file under the final name.

Outputs get the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask, typically
0644): ``mkstemp`` creates 0600 files, which would hide descriptors, CSVs and checkpoints from the
other users of a shared output folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from isc.errors import ConfigError


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to probe is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed and an existing ``path`` is left untouched,
    so a crash or bad input never leaves an output that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (also through links); False when either does not exist."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_outputs(
    outputs: dict[str, Path], inputs: dict[str, Path], overwrite: bool, param: str = "output"
) -> None:
    """Refuse, naming the file, an output that is an input (always) or that exists (unless ``overwrite``).

    ``outputs``/``inputs`` map a description (``--output``, ``--train-descriptors``...) to a path.
    """
    for out_name, out in outputs.items():
        for in_name, inp in inputs.items():
            if same_file(out, inp) or out.resolve() == inp.resolve():
                raise ConfigError(param, f"{out} ({out_name}) is the input {in_name}: writing it would "
                                  "destroy the input; choose another output path")
    existing = [f"{p} ({n})" for n, p in outputs.items() if p.exists()]
    if existing and not overwrite:
        raise ConfigError(param, f"{', '.join(existing)} already exist(s); pass --overwrite true to replace, "
                          "or choose another output folder")
