"""Run an entry point as one process or under torchrun: ``python -m isc.launch [options] -m MODULE ARGS...``.

The ``train`` and ``extract`` entry points (and so every training stage and extraction of the main job)
start through this launcher, so one parameter, ``nproc_per_node``, decides how many processes a step
uses -- the same command on a laptop (1) and on a machine with 8 GPUs (8):

* 1 process on 1 machine: ``python -m MODULE ARGS`` (the process is replaced: exactly the old command);
* N processes on 1 machine: :mod:`isc.local_torchrun` (torchrun whose rendezvous store listens on
  127.0.0.1 only), ``--nproc-per-node N``;
* several machines (``--nnodes M > 1``): plain ``torchrun`` with the *static* rendezvous at
  ``--rdzv-endpoint HOST:PORT`` (machine 0's address; it must be reachable from every machine: firewall
  it, see docs/operations.md); every machine runs the same step command with its own ``--node-rank``.
  Static, not c10d: c10d numbers the machines by sorting their host names and pids, so global rank 0 --
  the only process that talks to MLflow -- could land on a machine that has no run open. Node rank 0 is
  the machine that runs ``mlflow run``; ``isc main`` drives the others through ``isc join`` (isc/nodes.py).

Each process then takes ``global batch / world size`` items per step (``isc.train.loop``); NCCL on GPUs,
gloo on CPU (``isc.train.distributed.setup``); only global rank 0 talks to MLflow.
"""

from __future__ import annotations

import os
import signal
import sys

from isc.errors import ConfigError
from isc.local_torchrun import main as local_main
from isc.proctree import PARENT_ENV, STOP_SIGNALS, dead_parent_soon, end_with_parent, under_reporting_parent
from isc.tracking import report_dead_driver


def torchrun_args(nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str = "", node_rank: int = 0) -> list[str] | None:
    """torchrun's arguments for this layout, or None for a single process (no torchrun at all)."""
    if nproc_per_node < 1:
        raise ConfigError("nproc_per_node", f"must be >= 1, got {nproc_per_node}")
    if nnodes < 1:
        raise ConfigError("nnodes", f"must be >= 1, got {nnodes}")
    if nnodes == 1:
        if nproc_per_node == 1:
            return None
        return ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
                "--local-addr", "127.0.0.1", "--nproc-per-node", str(nproc_per_node)]
    split_endpoint(rdzv_endpoint, nnodes)
    if not 0 <= node_rank < nnodes:
        raise ConfigError("node_rank", f"must be in 0..{nnodes - 1} for {nnodes} machines, got {node_rank}")
    return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
            "--rdzv-endpoint", rdzv_endpoint, "--nproc-per-node", str(nproc_per_node)]


def split_endpoint(rdzv_endpoint: str, nnodes: int) -> tuple[str, int]:
    """``HOST:PORT`` of machine 0, checked: several machines need one, and the port is a real port."""
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ConfigError("rdzv_endpoint", f"{nnodes} machines need machine 0's HOST:PORT, reachable from every "
                                           f"machine (the port and the next one are used), got '{rdzv_endpoint}'")
    return host, int(port)


def _parse(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """``[--option value]... -m MODULE ARGS...`` (options: dash or underscore spelling)."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "-m":
        key = argv[i].lstrip("-").replace("-", "_")
        if key not in ("nproc_per_node", "nnodes", "rdzv_endpoint", "node_rank") or i + 1 >= len(argv):
            raise ConfigError("launch", f"unknown option or missing value: {argv[i]} (usage: python -m isc.launch "
                                        "[--nproc-per-node N] [--nnodes M --node-rank K --rdzv-endpoint HOST:PORT] -m MODULE ...)")
        options[key] = argv[i + 1]
        i += 2
    if i + 1 >= len(argv):
        raise ConfigError("launch", "no module to run: give -m MODULE ARGS...")
    return options, argv[i + 1], argv[i + 2:]


def _int(options: dict[str, str], name: str, default: int = 1) -> int:
    try:
        return int(options.get(name) or default)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got '{options[name]}'") from None


def _stop_once() -> None:
    """Under ``isc main``: torchrun's stop handler fires once, later stop signals are ignored while it stops
    the ranks (as :mod:`entrypoints.cli` does for a step). Why: each further signal raised torchrun's
    ``SignalException`` again, inside its wait for the ranks, so it exited while they still cleaned up.
    A SIGKILLed driver sends that: the kernel's PR_SET_PDEATHSIG comes once per driver thread that exits
    (2-3 in a row, measured), and ci17 saw a rank outlive torchrun and report torchrun as the dead driver.
    The driver SIGKILLs a step that does not end in its grace period, so nothing waits for ever."""
    import torch.distributed.elastic.multiprocessing.api as elastic_api

    torch_handler = elastic_api._terminate_process_handler  # start() installs it by this module-level name

    def once(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        torch_handler(signum, frame)

    elastic_api._terminate_process_handler = once


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, module, rest = _parse(argv)
        args = torchrun_args(_int(options, "nproc_per_node"), _int(options, "nnodes"),
                             options.get("rdzv_endpoint", ""), _int(options, "node_rank", 0))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args is None:
        os.execv(sys.executable, [sys.executable, "-m", module, *rest])
    from torch.distributed.elastic.multiprocessing.api import SignalException


    quiet = under_reporting_parent()  # a step of `isc main`: the driver prints the line
    driver = os.environ.get(PARENT_ENV, "")
    if quiet:
        _stop_once()
    end_with_parent()  # SIGTERM (torchrun stops its ranks) when the driver is killed
    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks stay quiet: this process reports for them
    try:
        if args[:2] == ["--nnodes", "1"]:

            return local_main([*args, "-m", module, *rest])
        from torch.distributed.run import main as torchrun_main

        torchrun_main([*args, "-m", module, *rest])
    except SignalException as exc:
        # torchrun turns SIGTERM / SIGINT into this exception after it has stopped its ranks (SIGTERM, then
        # SIGKILL after its own grace period); rank 0 has marked the run KILLED. One line, not a traceback.
        if not quiet:
            print(f"error: interrupted by {signal.Signals(exc.sigval).name}; the ranks were stopped and the "
                  "MLflow run (if one was open) is marked KILLED", file=sys.stderr)
        elif dead_parent_soon(exc.sigval, driver) is not None:  # the driver was SIGKILLed: nobody else reports

            report_dead_driver(driver, os.environ.get("MLFLOW_RUN_ID", ""))
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
