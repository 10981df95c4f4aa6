"""The main job's child processes end with it: SIGTERM / SIGINT to ``isc main`` stops every step process.

Why: each step of the main job is a tree of processes -- ``mlflow.run`` starts ``bash -c <command>`` (bash
execs it), ``isc.launch`` may start torchrun, torchrun its ranks, each rank its DataLoader workers. A signal
sent to the driver alone (``kill PID``, Kubernetes, a batch system that signals only the job's first
process) reaches none of them, and MLflow's own cancel sends one SIGTERM to the first child and then waits
for it without limit. :func:`children_end_with_us` makes the driver forward the signal to its children,
wait a grace period (``ISC_STOP_GRACE_S``, default 20 s: under Kubernetes' and Slurm's 30 s before their
SIGKILL) and SIGKILL whatever is left of the tree -- recorded as it was when the signal came, so processes
whose parent died first are found too.

Step processes learn that a parent reports for them from :data:`PARENT_ENV` (set to the driver's pid):
they then stay quiet on a signal (one line on stderr, the driver's) and ignore a repeated one while they
clean up (a Ctrl-C at a terminal reaches every process of the job, and the driver forwards it again).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.util  # imported first, its exit hook runs after ours (atexit: last in, first out)
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

log = logging.getLogger("isc.proctree")

# The signals that end a command as an interruption (run KILLED, partial files removed, one line): SIGTERM
# (timeout, Slurm, Kubernetes), SIGINT (Ctrl-C), SIGHUP (the terminal or ssh session went away) and SIGQUIT
# (Ctrl-\\). Unhandled, the last two killed the process and left its MLflow run RUNNING for ever.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PARENT_ENV = "ISC_PARENT_PID"  # set for step processes: a parent process reports their interruption
GRACE_ENV = "ISC_STOP_GRACE_S"
DEFAULT_GRACE_S = 20.0
ORPHAN_WAIT_S = 3.0  # processes left once every step process has ended (e.g. DataLoader workers, which
#                      exit by themselves within PyTorch's 5 s watchdog) get this long, not the full grace


def grace_s() -> float:
    """Seconds a stopped step gets to mark its run and remove its files before it is SIGKILLed."""
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def under_reporting_parent() -> bool:
    """True in a step process whose parent (the main job, or ``isc.launch`` for torchrun ranks) reports a
    signal for it."""
    return bool(os.environ.get(PARENT_ENV))


def dead_parent(parent: str | None = None) -> str | None:
    """The pid of the parent that reported for this step process (:data:`PARENT_ENV`, or ``parent``) when
    that parent has died (we were re-parented), else None."""
    parent = os.environ.get(PARENT_ENV, "") if parent is None else parent
    return parent if parent.isdigit() and os.getppid() != int(parent) else None


def dead_parent_soon(signum: int, parent: str | None = None, wait_s: float = 1.0) -> str | None:
    """:func:`dead_parent`, looked at again for up to ``wait_s`` after a SIGTERM (the signal the kernel sends
    when the parent dies). Why: a parent killed by SIGKILL dies thread by thread, and ``getppid()`` names it
    until its last thread is gone -- after the kernel's PR_SET_PDEATHSIG, which comes as its first thread
    exits. Seen in CI: a step ended KILLED after its driver's SIGKILL but printed nothing. A live parent's
    forwarded SIGTERM costs this wait at most."""
    deadline = time.monotonic() + (wait_s if signum == signal.SIGTERM else 0.0)
    while (dead := dead_parent(parent)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return dead


def end_with_parent() -> None:
    """In a step process: get SIGTERM when the parent that reports for it (:data:`PARENT_ENV`) dies -- also
    by SIGKILL or the OOM killer, which nothing in the parent can handle (before: the step trained on, an
    orphan, to the end). Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere or outside ``isc main``."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return
    if os.getppid() == int(parent):  # only a direct child: the death signal follows the direct parent
        try:

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:  # the parent died before the prctl: nothing would signal us
        os.kill(os.getpid(), signal.SIGTERM)
    except PermissionError:
        pass


def _end_loader_workers_at_exit() -> None:
    """SIGKILL this process's DataLoader workers still alive at interpreter exit.

    Why: :func:`loader_worker_init` makes workers ignore SIGTERM, and at exit ``multiprocessing`` ends its
    daemonic children with SIGTERM and then joins them without a limit. A DataLoader iterator still
    referenced then (kept by a reference cycle, e.g. an interrupt's traceback; torch skips its own worker
    shutdown once the interpreter is exiting) left workers that ignored that SIGTERM and waited for work
    from a parent waiting for them: the step never exited (seen as a ~1/15 hang of a SIGTERMed step).
    Workers hold nothing to save. Registered after ``multiprocessing.util``'s exit hook, so it runs first."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    with contextlib.suppress(ValueError):  # not the main thread: leave torch's handler
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's would raise "worker is killed" mid-exit
    for proc in workers:  # what multiprocessing would SIGTERM next: the DataLoader workers of isc processes
        with contextlib.suppress(OSError, ValueError):
            proc.kill()


atexit.register(_end_loader_workers_at_exit)


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: a worker ignores SIGTERM (and SIGHUP / SIGQUIT, which a
    terminal sends to the whole process group just the same).

    Why: a SIGTERM to a process group (``timeout``, torchrun stopping a rank with ``killpg``, Slurm) reaches
    the DataLoader workers too; a worker killed by it makes its main process fail with "DataLoader worker
    ... is killed by signal: Terminated" (a RuntimeError: run FAILED, a traceback per rank) before that
    process handles its own SIGTERM (run KILLED). Ignoring it, the worker is ended by its main process as
    the interrupt unwinds (or exits by itself once that process is gone; the driver SIGKILLs leftovers).
    SIGINT needs nothing: PyTorch's worker loop already exits quietly on it.

    It also keeps quiet about a main process that went away while fetching a batch's shared-memory file
    descriptor from the worker: ``multiprocessing``'s resource sharer thread printed that lost connection
    as a traceback through ``sys.excepthook`` (CI, a step interrupted mid-batch: a traceback beside the
    step's one line)."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    sys.excepthook = _quiet_about_a_lost_fetcher(sys.excepthook)


def _quiet_about_a_lost_fetcher(hook):
    def excepthook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, (ConnectionError, EOFError)) and any(
                frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(tb)):
            return
        hook(exc_type, exc, tb)

    return excepthook


def _gone(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # NoSuchProcess, or a pid reused by another process (psutil checks create time)
        return True


def stop_children(sig: int, grace: float, hurry: Callable[[], bool] = lambda: False) -> list[int]:
    """End every descendant of this process; returns the pids of all that were found.

    ``sig`` goes to the direct children (the step's process: it marks its run KILLED and removes its
    temporary files; torchrun passes it on to its ranks) unless they exit within a second by themselves
    (they may have had the signal too: a terminal's Ctrl-C, ``timeout``'s process group). The tree is
    watched for ``grace`` seconds (:data:`ORPHAN_WAIT_S` once the direct children have ended), or until
    ``hurry()`` (a second signal), then what is left is SIGKILLed.
    Zombies count as ended: the code that started a child reaps it.
    """
    import psutil

    me = psutil.Process()
    seen: dict[int, psutil.Process] = {}

    def scan() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            for proc in me.children(recursive=True):
                seen.setdefault(proc.pid, proc)
        return [p for p in seen.values() if not _gone(p)]

    if not scan():
        return []
    t0 = time.monotonic()
    deadline = t0 + grace
    forwarded = False
    while (alive := scan()) and time.monotonic() < deadline and not hurry():
        with contextlib.suppress(psutil.Error):
            direct = [c for c in me.children() if not _gone(c)]
        if not forwarded and time.monotonic() - t0 >= min(1.0, grace):
            for child in direct:
                with contextlib.suppress(psutil.Error):
                    child.send_signal(sig)
            forwarded = True
        if forwarded and not direct:  # the steps have ended; what is left is orphaned: a short wait only
            deadline = min(deadline, time.monotonic() + ORPHAN_WAIT_S)
        time.sleep(0.05)
    alive = scan()
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        log.info("SIGKILLed %d process(es) still alive %.0f s after the signal", len(alive), time.monotonic() - t0)
        end = time.monotonic() + 10
        while any(not _gone(p) for p in alive) and time.monotonic() < end:
            time.sleep(0.05)  # polled, not waited on: reaping our own child would steal its exit status
    return sorted(seen)


@contextlib.contextmanager
def children_end_with_us(on_stopped: Callable[[list[int]], None]) -> Iterator[None]:
    """While the block runs, SIGTERM / SIGINT first end this process's children (:func:`stop_children`),
    then call ``on_stopped(pids)`` (mark runs, remove files), then act as before (the ``isc`` command
    raises its interrupt: the run ends KILLED, one line, exit 143 / 130).

    Why in the handler and not after the exception: MLflow's ``mlflow.run`` catches the interrupt first and
    waits for its child without a time limit, and marks a step run it finds RUNNING as FAILED. Stopped
    here, the child has already ended and its run is KILLED when MLflow looks. A repeat of the signal
    during the grace period SIGKILLs the tree at once. Children also learn (:data:`PARENT_ENV`) that this
    process reports for them. Main thread only (Python runs signal handlers there); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = STOP_SIGNALS
    previous = {s: signal.getsignal(s) for s in sigs}
    repeated = threading.Event()
    old_env = os.environ.get(PARENT_ENV)

    def repeat(signum: int, frame: object) -> None:
        repeated.set()

    def handler(signum: int, frame: object) -> None:
        for s in sigs:
            signal.signal(s, repeat)
        pids = stop_children(signum, grace_s(), repeated.is_set)
        if pids:
            with contextlib.suppress(Exception):
                on_stopped(pids)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        raise KeyboardInterrupt

    for s in sigs:
        signal.signal(s, handler)
    os.environ[PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if old_env is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = old_env
