"""The ``isc`` console command: ``isc <subcommand> [options]``.

Each subcommand is the ``main(argv)`` of a module in ``entrypoints/`` -- the same module that the
MLproject entry point of that name runs (``python -m entrypoints.<module>``, through
:func:`entrypoints._run.cli`) -- so the CLI and ``mlflow run`` behave identically. The dispatch lives
here, on the entry-point side: the ``isc`` library never imports ``entrypoints`` (tests/test_layout.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading

from isc.errors import ISCError
from isc.fileutil import disk_error_in, os_error_line
from isc.proctree import STOP_SIGNALS, dead_parent_soon, end_with_parent, under_reporting_parent
from isc.redact import install_log_redaction, redact
from isc.tracking import report_dead_driver

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("entrypoints.make_mini", "build a DISC21-shaped mini dataset (isc data make-mini ...)"),
    "baseline": ("entrypoints.baseline", "perceptual-hash / thumbnail baseline descriptors + evaluation"),
    "evaluate": ("entrypoints.evaluate", "score a descriptor h5 with the official ISC21 protocol"),
    "train": ("entrypoints.train", "train a descriptor model (one recipe stage)"),
    "extract": ("entrypoints.extract", "extract query/reference/training descriptors"),
    "settings": ("entrypoints.settings", "choose a model's extraction settings (size, TTA) on the val split"),
    "postprocess": ("entrypoints.postprocess", "negative embedding subtraction"),
    "match": ("entrypoints.match", "matching-track CSV from descriptors"),
    "tune": ("entrypoints.tune", "Optuna study over margins, memory size, lr"),
    "promote": ("entrypoints.promote", "register the best evaluated model and move @champion"),
    "search": ("entrypoints.search", "find copies of query images with a registered model"),
    "serve": ("entrypoints.serve", "serve a registered model over HTTP (no tracebacks in error answers)"),
    "export": ("entrypoints.export", "a registered model as a standalone TorchScript/ONNX file"),
    "import-seed": ("entrypoints.import_seed", "the seed's own checkpoint as an isc model (optionally registered)"),
    "main": ("entrypoints.main", "the whole pipeline, data to promoted champion"),
    "join": ("entrypoints.join", "run machine 0's main job's training and extraction here too (several machines)"),
}


def _usage() -> str:
    lines = ["usage: isc <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "isc <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"isc: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_entrypoint(COMMANDS[name][0], rest)


def run_entrypoint(module: str, argv: list[str]) -> int:
    """Run ``module.main(argv)``; an ``ISCError`` becomes one ``error:`` line and exit status 2.

    Log records and the error line pass through :mod:`isc.redact`, so a password in a URI or a
    command line never reaches the terminal or a captured log.
    """

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod = importlib.import_module(module)
    install_log_redaction()  # after the import: MLflow adds its own handlers when imported
    previous = _catch_signals()
    step_run = os.environ.get("MLFLOW_RUN_ID", "")  # `mlflow run`'s; MLflow unsets it when the run ends

    end_with_parent()  # a step of `isc main` (or a torchrun rank) ends when its parent is killed
    try:
        return int(mod.main(argv) or 0)
    except KeyboardInterrupt as exc:
        # SIGTERM (timeout, Slurm, Kubernetes) arrives as Terminated, Ctrl-C as KeyboardInterrupt: the
        # tracked run ends KILLED and atomic outputs drop their temporary files on the way out.
        # A step of `isc main` (or a torchrun rank) stays quiet: its parent prints the one line.

        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name if isinstance(exc, Terminated) else "SIGINT (Ctrl-C)"
        if not under_reporting_parent():
            print(f"error: interrupted by {name}; its MLflow run (if one was open) is marked KILLED and "
                  "unfinished outputs were removed", file=sys.stderr)
        elif (driver := dead_parent_soon(signum)) is not None:  # nobody is left to report: this step says it

            report_dead_driver(driver, step_run)
        return 128 + int(signum)
    except ISCError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full, read-only or failing disk (ENOSPC, EROFS, EIO), a quota or `ulimit -f`: atomic outputs
        # have dropped their temporary files and a tracked run has ended FAILED; say which file, in one line.

        logging.getLogger(__name__).debug("OS error", exc_info=True)
        print(f"error: {redact(os_error_line(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:
        # An MLflow failure that got past the checks (a server that imitates MLflow's probe endpoints and
        # then answers 404, a store that fails mid-run): one line naming the tracking URI, not a traceback.
        # A database store that fails under MLflow's own code (SQLite "disk I/O error", "database or
        # disk is full" while migrating or logging) raises SQLAlchemy's errors unwrapped: same line.

        disk = disk_error_in(exc)
        if disk is not None:  # e.g. h5py's RuntimeError from closing a file whose write hit ENOSPC/EFBIG
            logging.getLogger(__name__).debug("disk error", exc_info=True)
            print(f"error: {redact(os_error_line(disk))}", file=sys.stderr)
            return 2
        mlflow_errors, sql_errors = sys.modules.get("mlflow.exceptions"), sys.modules.get("sqlalchemy.exc")
        if not ((mlflow_errors and isinstance(exc, mlflow_errors.MlflowException))
                or (sql_errors and isinstance(exc, sql_errors.SQLAlchemyError))):
            raise
        logging.getLogger(__name__).debug("MLflow error", exc_info=True)
        lines = str(getattr(exc, "message", "") or getattr(exc, "orig", "") or exc).strip().splitlines()
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        print(f"error: MLflow tracking store {redact(uri) or '(default)'}: {redact(lines[0] if lines else '')}",
              file=sys.stderr)
        return 2
    finally:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)
        if previous is not None:
            sys.unraisablehook = sys.__unraisablehook__


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP, SIGQUIT: ``signum``), raised in the main thread like Ctrl-C's KeyboardInterrupt
    so the same cleanup runs (``tracked_run`` marks the run KILLED; ``atomic_path`` removes its temporary
    file)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = int(signum)


class Interrupted(KeyboardInterrupt):
    """SIGINT as a subclass of KeyboardInterrupt. Why not the built-in one: when a plain KeyboardInterrupt
    passes through C code that evaluates Python (torch, h5py), CPython flags it as unhandled and, at exit,
    kills itself with SIGINT whatever status we return (exit -2 instead of 130, seen about one run in two);
    the flag is set for the exact built-in type only."""


def _once_under_parent() -> None:
    """In a step of ``isc main``: ignore a repeat of the signal while the first one's cleanup runs (a
    terminal's Ctrl-C reaches every process of the job and the driver forwards it again; a second interrupt
    would cut the run's KILLED mark short). The driver SIGKILLs a step that does not end in its grace period."""

    if under_reporting_parent():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _raise_terminated(signum: int, frame: object) -> None:
    _once_under_parent()
    raise Terminated(signum)


def _raise_interrupted(signum: int, frame: object) -> None:
    _once_under_parent()
    raise Interrupted()


def _reraise_swallowed(unraisable: object) -> None:
    """``sys.unraisablehook``: a signal that arrived while a finalizer ran (a weakref callback, ``__del__``:
    seen in SQLAlchemy's garbage collection) raised its interrupt there, where Python only prints "Exception
    ignored" -- and the command ran on to exit 0 with its run FINISHED. Send the signal again (re-armed:
    under ``isc main`` the first one set repeats to be ignored), so it is raised in the code that runs next."""
    exc = getattr(unraisable, "exc_value", None)
    if isinstance(exc, Terminated | Interrupted):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        signal.signal(signum, _raise_terminated if isinstance(exc, Terminated) else _raise_interrupted)

        # from another thread, a moment later: sent from here it would be raised inside this hook, ignored again
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    sys.__unraisablehook__(unraisable)  # type: ignore[arg-type]


def _catch_signals() -> dict[int, object] | None:
    """Install the handlers of :data:`isc.proctree.STOP_SIGNALS` (main thread only); returns the previous
    ones, or None."""

    if threading.current_thread() is not threading.main_thread():
        return None
    sys.unraisablehook = _reraise_swallowed
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack on stderr, for a step that hangs
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stderr with no file descriptor:
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)  # (captured, in-process) skip
    return {signum: signal.signal(signum, _raise_interrupted if signum == signal.SIGINT else _raise_terminated)
            for signum in STOP_SIGNALS}


if __name__ == "__main__":
    sys.exit(main())
