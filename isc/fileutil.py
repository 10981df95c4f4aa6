"""Atomic file output: a reader never sees a half-written file under the final name.

Outputs get the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask, typically
0644): ``mkstemp`` creates 0600 files, which would hide descriptors, CSVs and checkpoints from the
other users of a shared output folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
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


def _owner() -> str:
    """``@<host>@<pid>``: who writes a temporary file (the host too: output folders may be shared)."""
    return f"@{socket.gethostname()}@{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` left by a killed writer on this host (SIGKILL, OOM killer,
    power loss: nothing ran to clean up) whose process is gone; returns them. Files of live processes,
    of other hosts and of other outputs are left alone."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.@{re.escape(socket.gethostname())}@(\d+)\..*\.partial$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def remove_dead_partials(root: str | Path) -> list[Path]:
    """:func:`remove_stale_partials` for every output under ``root`` (a folder tree): the temporary files of
    writers on this host whose process is gone. The main job calls it after it stopped its steps, so what a
    SIGKILLed step left is removed at once, not only when that output is next written."""
    pattern = re.compile(rf"^\..+\.@{re.escape(socket.gethostname())}@(\d+)\..*\.partial$")
    removed = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            m = pattern.match(name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(Path(folder, name))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On any exception (also a SIGTERM/Ctrl-C turned into one by the CLI) the temporary file is removed
    and an existing ``path`` is left untouched, so a crash or bad input never leaves an output that
    looks complete. The temporary name carries host and pid, so the next writer of ``path`` removes
    what a SIGKILLed one left (:func:`remove_stale_partials`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".partial", dir=path.parent)
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
    outputs: dict[str, str | Path],
    inputs: dict[str, str | Path | None],
    overwrite: bool,
    param: str = "output",
) -> list[Path]:
    """The one output rule of every command that writes files; returns the output paths.

    Refused, naming the file: an output that is a folder, an output that is an input (always: through
    symlinks, hard links and ``../`` too, whatever ``overwrite`` says), and an output that exists unless
    ``overwrite``. ``outputs``/``inputs`` map a description (``--output``, ``--train-descriptors``, an
    image id...) to a path; an empty input (an MLflow URI, an absent option) is skipped.
    Why one function: the commands that once each had their own check differed, and three of them
    replaced existing files silently.
    """
    outs = {name: Path(p).expanduser() for name, p in outputs.items()}
    ins = {name: Path(p).expanduser() for name, p in inputs.items() if p is not None and str(p).strip()}
    by_path = {p.resolve(): name for name, p in ins.items()}
    by_inode: dict[tuple[int, int], str] | None = None
    for out_name, out in outs.items():
        if out.is_dir():
            raise ConfigError(param, f"{out} ({out_name}) is a folder; give a file path")
        hit = by_path.get(out.resolve())
        if hit is None and out.exists():
            if by_inode is None:  # hard links: stat the inputs once, only when some output exists
                by_inode = {}
                for name, p in ins.items():
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        by_inode[(st.st_dev, st.st_ino)] = name
            with contextlib.suppress(OSError):
                st = out.stat()
                hit = by_inode.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise ConfigError(param, f"{out} ({out_name}) is both an input and an output (the input {hit}); "
                                     "writing it would destroy the input; choose another output path")
    existing = [f"{p} ({n})" for n, p in outs.items() if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ConfigError(param, f"{', '.join(existing)} already exists; pass --overwrite true to replace it, "
                                 "or choose another output path")
    return list(outs.values())


_PARTIAL_RE = re.compile(r"^\.(?P<name>.+?)\.(?:@[^@/]*@\d+\.)?[^./]+\.partial$")
_H5_FILENAME_RE = re.compile(r"(?:filename|name) = '([^']+)'")


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that reached the command line (full disk, read-only or failing disk, quota,
    ``ulimit -f``, a path under /proc): the file -- the final output, not its temporary name -- and the
    reason. h5py's errors carry the file only inside their (multi-line) message."""
    name = exc.filename
    if not name:
        m = _H5_FILENAME_RE.search(str(exc))
        name = m.group(1) if m else None
    if name:
        path = Path(os.fsdecode(name))
        m = _PARTIAL_RE.match(path.name)
        name = str(path.with_name(m.group("name"))) if m else str(path)
    reason = os.strerror(exc.errno) if exc.errno else (str(exc).splitlines() or [type(exc).__name__])[0]
    extra = "; files that existed before are untouched" if exc.errno in _DISK_ERRNOS else ""
    return f"{name or 'a file'}: {reason}{extra}"


_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EFBIG}


def disk_error_in(exc: BaseException) -> OSError | None:
    """The OSError of a full/read-only/failing disk behind ``exc``, if any: h5py, for one, reports the
    failed write as an OSError and then raises a RuntimeError from closing the file on top of it."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return e
        stack += [e.__cause__, e.__context__]
    return None


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints and exports are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
