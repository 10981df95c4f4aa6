"""Atomic file output: a reader never sees a half-written file under the final name.

Outputs get the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask, typically
0644): ``mkstemp`` creates 0600 files, which would hide descriptors, CSVs and checkpoints from the
other users of a shared output folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
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


NAME_MAX = 255  # bytes per file name on ext4, xfs, btrfs, tmpfs, NFS


def partial_stem(name: str) -> str:
    """``name`` as it appears in its temporary names (``.<stem>.@host@pid.XXXXXXXX.partial``): itself when
    that fits :data:`NAME_MAX`, else its head and ``~`` + 8 hex of its hash -- a legal 244-byte output name
    failed 'File name too long' on its temporary name. Room is kept for any pid, so every writer of one
    output (and :func:`remove_stale_partials`) computes the same stem."""
    raw = os.fsencode(name)
    room = NAME_MAX - len(f"..@{socket.gethostname()}@{'9' * 10}..XXXXXXXX.partial".encode())
    if len(raw) <= room:
        return name
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    return raw[: room - len(tag)].decode("utf-8", "ignore") + tag


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
    pattern = re.compile(rf"^\.{re.escape(partial_stem(path.name))}\.@{re.escape(socket.gethostname())}@(\d+)\..*\.partial$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir(follow_symlinks=False):  # a folder output (make-mini) is built in one
                        shutil.rmtree(entry.path)
                    else:
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
    fd, tmp = tempfile.mkstemp(prefix=f".{partial_stem(path.name)}.{_owner()}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        named = _named_disk_error(exc, tmp_path)
        if named is not None:
            raise named from exc
        raise


def partial_dir(path: str | Path) -> Path:
    """A new, empty folder beside ``path`` to build a folder output in, named like :func:`atomic_path`'s
    temporaries (one per process: two writers at once never share it; :func:`remove_stale_partials` finds a
    killed one's), with a plain folder's mode (``mkdtemp`` gives 0700). Stale ones are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{partial_stem(path.name)}.{_owner()}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _named_disk_error(exc: BaseException, tmp: Path) -> OSError | None:
    """A full/read-only/failing disk error of writing ``tmp`` that names no file, as an OSError naming it
    (``os_error_line`` shows the output's own name): a failed ``write``/``close`` carries no file name, and
    faiss reports a short write as a RuntimeError. None for anything else (raised as it was)."""
    disk = disk_error_in(exc)
    if disk is not None:
        return None if disk.filename else OSError(disk.errno, disk.strerror, str(tmp))
    if isinstance(exc, Exception) and not isinstance(exc, OSError):
        text = str(exc)
        for code in sorted(_DISK_ERRNOS):
            if f"({os.strerror(code)})" in text or text.endswith(os.strerror(code)):
                return OSError(code, os.strerror(code), str(tmp))
    return None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def no_space(path: str | Path, needed: int, free: int) -> OSError:
    """The ENOSPC error of an output that does not fit: names the file, the size it needs and the free space."""
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (needs ~{_mib(needed)}, {_mib(free)} free)", str(path))


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use in ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_free_space(path: str | Path, needed: int) -> None:
    """Refuse (ENOSPC, naming ``path``) an output of ``needed`` bytes that its filesystem cannot hold."""
    free = free_bytes(Path(path).parent)
    if needed > free:
        raise no_space(path, needed, free)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's file I/O, the free space checked first: a full or failing disk
    is an OSError that names ``path`` (a failed ``write`` or ``close`` alone carries no file name)."""
    check_free_space(path, len(data))
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # delayed allocation: ENOSPC may only show here
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def copy_file(src: str | Path, dst: str | Path) -> None:
    """``shutil.copyfile`` whose full-disk error names ``dst`` (checked against the free space first)."""

    check_free_space(dst, os.path.getsize(src))
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(dst)) from exc


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reserve_space(path: str | Path, needed: int, final: str | Path | None = None) -> bool:
    """Reserve ``needed`` bytes of disk for a file being written (``fallocate`` with KEEP_SIZE: blocks
    allocated, size unchanged), after checking the free space; the error names ``final`` (the output,
    not its temporary name). Returns False where the filesystem cannot reserve (the free-space check
    alone then guards).

    Why: HDF5 crashes the process (segfault, exit 139) when a write of its own fails and the file is then
    closed -- a Python-side exception cannot help once its cache holds unwritable data -- so an h5 output
    gets its space before HDF5 writes a byte. Release the unused part with :func:`release_reserved`."""
    import resource  # POSIX only: imported where used, so the module still imports elsewhere


    name = final or path
    free = free_bytes(Path(path).parent)
    if needed > free:
        raise no_space(name, needed, free)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # `ulimit -f`: a reservation does not trip it, a write does
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)} (needs ~{_mib(needed)}, the file size limit "
                                   f"is {_mib(limit)})", str(name))
    fd = os.open(path, os.O_WRONLY)
    try:
        _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, needed)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(name, needed, free_bytes(Path(path).parent)) from None
        if exc.errno in _DISK_ERRNOS:
            raise OSError(exc.errno, exc.strerror, str(name)) from None
        return False  # EOPNOTSUPP (NFS, some FUSE), ENOSYS: nothing reserved
    finally:
        os.close(fd)
    return True


def release_reserved(path: str | Path) -> None:
    """Give back the blocks :func:`reserve_space` reserved beyond the file's end (no-op when none are)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            _fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, size, 1 << 62)
        finally:
            os.close(fd)


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
        kind = special_file_kind(out)
        if kind:  # --overwrite would rename a regular file onto it: /dev/null replaced by descriptors
            raise ConfigError(param, f"{out} ({out_name}) is a {kind}, not a regular file; outputs are written "
                                     "as new files, so give a file path")
    existing = [f"{p} ({n})" for n, p in outs.items() if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise ConfigError(param, f"{', '.join(existing)} already exists; pass --overwrite true to replace it, "
                                 "or choose another output path")
    return list(outs.values())


def special_file_kind(path: Path) -> str:
    """``"character device"``, ``"block device"``, ``"FIFO"`` or ``"socket"`` for such a path (through
    symlinks); ``""`` for a regular file, a folder or nothing there."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return kind
    return ""


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
        parts = Path(os.fsdecode(name)).parts  # a file inside a folder output's temporary: name the output
        name = str(Path(*[(m.group("name") if (m := _PARTIAL_RE.match(p)) else p) for p in parts]))
    reason = os.strerror(exc.errno) if exc.errno else (str(exc).splitlines() or [type(exc).__name__])[0]
    if exc.errno and isinstance(exc.strerror, str) and exc.strerror.startswith(f"{reason} ("):
        reason = exc.strerror  # ours, with detail (no_space: needed and free sizes)
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
