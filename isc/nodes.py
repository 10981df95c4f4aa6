"""One ``isc main`` on several machines: machine 0 runs the driver, every other machine runs ``isc join``.

The driver starts every training stage and extraction through ``isc.launch`` under ``mlflow run`` on
machine 0 (node rank 0, so global rank 0 -- the only MLflow client -- is the process with the run open).
The other machines must start the same step at the same time with their own node rank; they learn it from
a small board the driver hosts (a torch ``TCPStore`` at the rendezvous port + 1). Keys hold JSON:

* ``job``           driver -> machines: process layout, the paths every machine must see, a probe file
* ``join/<k>``      machine k -> driver: its host name and the problems it found (checked before stage 0)
* ``step/<i>``      driver -> machines: ``{"module": ..., "args": [...]}`` of launched step i, or
                    ``{"stop": true, "ok": ...}`` at the end of the job
* ``done/<i>/<k>``  machine k -> driver: the step's exit status

A joined machine only ever runs ``python -m isc.launch ... -m <entrypoints.train|entrypoints.extract>`` with
an argument list (no shell): the board is as unauthenticated as torchrun's own store, so what it can make a
machine do is limited to the project's two distributed steps. Keep both ports inside the cluster.

Every machine needs the same data and output folders (shared storage; checked with a probe file the
driver writes) and the same tracking URI (compared by hash, never sent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from isc.errors import ConfigError, ISCError
from isc.launch import split_endpoint

log = logging.getLogger(__name__)

# The steps a joined machine may start, as `python -m isc.launch ... -m MODULE ARGS`.
JOINABLE_MODULES = ("entrypoints.train", "entrypoints.extract")
POLL_S = 0.5


class JoinError(ISCError):
    """A machine could not join, or lost, the job (one line, exit status 2)."""


@dataclass(frozen=True)
class Layout:
    """How many machines and processes a job uses, and machine 0's rendezvous address."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def board_address(self) -> tuple[str, int]:
        return board_address(self.rdzv_endpoint, self.nnodes)

    def check(self) -> None:
        if self.nnodes < 1:
            raise ConfigError("nnodes", f"must be >= 1, got {self.nnodes}")
        if self.nnodes > 1:
            split_endpoint(self.rdzv_endpoint, self.nnodes)  # raises naming rdzv_endpoint when not HOST:PORT

    def step_parameters(self) -> dict[str, Any]:
        """What the driver adds to a launched step's MLproject parameters (nothing on one machine, so the
        reuse of finished one-machine runs keys on exactly what it did before)."""
        if self.nnodes == 1:
            return {}
        return {"nnodes": self.nnodes, "rdzv_endpoint": self.rdzv_endpoint, "node_rank": 0}


def board_address(rdzv_endpoint: str, nnodes: int) -> tuple[str, int]:
    """Machine 0's step board: the rendezvous host, the rendezvous port + 1."""
    host, port = split_endpoint(rdzv_endpoint, nnodes)
    return host, port + 1


def tracking_fingerprint() -> str:
    """A hash of the tracking URI: machines compare stores without sending a URI that may hold a password."""
    import mlflow

    return hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:16]


def step_argv(project_dir: Path, entry_point: str, parameters: dict[str, Any]) -> tuple[str, list[str]]:
    """The module and arguments ``mlflow run`` gives ``isc.launch`` for this entry point and parameters.

    Built from the MLproject file the way MLflow builds it (defaults filled in, each value shell-quoted
    into the template), then split back into an argument list."""
    import yaml

    spec = yaml.safe_load((project_dir / "MLproject").read_text())["entry_points"][entry_point]
    values = {name: (parameters[name] if name in parameters else p.get("default", "") if isinstance(p, dict) else "")
              for name, p in spec.get("parameters", {}).items()}
    argv = shlex.split(spec["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()}))
    if argv[:3] != ["python", "-m", "isc.launch"] or "-m" not in argv[3:]:
        raise ConfigError("entry_point", f"{entry_point} does not start through isc.launch; it cannot span machines")
    at = argv.index("-m", 3)
    return argv[at + 1], argv[at + 2:]


class Board:
    """The driver's side: hosts the store, waits for every machine, announces steps, says stop."""

    def __init__(self, layout: Layout, join_timeout_s: float = 900.0):
        import torch.distributed as dist

        layout.check()
        self.layout = layout
        host, port = layout.board_address
        self.join_timeout_s = join_timeout_s
        try:
            self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=max(join_timeout_s, 60)))
        except (RuntimeError, OSError) as exc:
            raise ConfigError("rdzv_endpoint", f"machine 0 cannot listen on port {port} (rendezvous port + 1) for "
                                               f"the other machines: {exc}") from None
        self.steps = 0
        self.joined: list[int] = []  # the machines that joined with no problem: the ones told to stop

    def _set(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(key, json.dumps(value))

    def _get(self, key: str) -> dict[str, Any]:
        return json.loads(self.store.get(key).decode())

    def gather(self, data_dir: Path, out_root: Path) -> list[str]:
        """Publish the job and wait (up to join_timeout_s) for every machine to join; returns the problems
        (missing machines, folders they cannot see, another tracking store), one line each."""
        out_root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = out_root / f".isc-join-{token[:8]}"
        probe.write_text(token)
        self._set("job", {"nproc_per_node": self.layout.nproc_per_node, "nnodes": self.layout.nnodes,
                          "rdzv_endpoint": self.layout.rdzv_endpoint, "data": str(data_dir),
                          "outputs": str(out_root), "probe": str(probe), "token": token,
                          "tracking": tracking_fingerprint()})
        wanted = [f"join/{k}" for k in range(1, self.layout.nnodes)]
        deadline = time.monotonic() + self.join_timeout_s
        log.info("waiting up to %.0f s for %d other machine(s) to run `isc join --rdzv-endpoint %s --node-rank K`",
                 self.join_timeout_s, len(wanted), self.layout.rdzv_endpoint)
        while time.monotonic() < deadline and not self.store.check(wanted):
            time.sleep(POLL_S)
        problems = []
        for k, key in enumerate(wanted, start=1):
            if not self.store.check([key]):
                problems.append(f"node_rank {k}: did not join within {self.join_timeout_s:.0f} s (join_timeout)")
                continue
            reply = self._get(key)
            problems += [f"node_rank {k} ({reply.get('host', '?')}): {p}" for p in reply.get("problems", [])]
            if not reply.get("problems"):
                self.joined.append(k)
        probe.unlink(missing_ok=True)
        return problems

    def announce(self, project_dir: Path, entry_point: str, parameters: dict[str, Any]) -> None:
        """Tell every machine to start this launched step now."""
        module, args = step_argv(project_dir, entry_point, parameters)
        self._set(f"step/{self.steps}", {"module": module, "args": args})
        self.steps += 1

    def results(self, i: int, wait_s: float = 120.0) -> dict[int, int | None]:
        """The joined machines' exit statuses of step ``i`` (None: not reported within ``wait_s``)."""
        keys = {k: f"done/{i}/{k}" for k in self.joined}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not self.store.check(list(keys.values())):
            time.sleep(POLL_S)
        return {k: self._get(key)["rc"] if self.store.check([key]) else None for k, key in keys.items()}

    def stop(self, ok: bool) -> None:
        """The job is over: every machine exits (0 when ``ok``)."""
        try:
            self._set(f"step/{self.steps}", {"stop": True, "ok": bool(ok)})
            self.results(self.steps, wait_s=30.0)  # they read it before the store goes with this process
        except (RuntimeError, OSError):  # a machine gone already: nothing left to tell it
            pass


def _client(endpoint: str, timeout_s: float):
    import torch.distributed as dist

    host, port = board_address(endpoint, 2)
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        raise JoinError(f"rdzv_endpoint: no `isc main` is waiting for machines at {host}:{port} "
                        f"(rendezvous port + 1) after {timeout_s:.0f} s: {exc}") from None


def _check_job(job: dict[str, Any]) -> list[str]:
    """What this machine cannot do of the job: folders it cannot see, another tracking store."""
    problems = []
    if not (Path(job["data"]) / "reference_images").is_dir():
        problems.append(f"data: {job['data']} is not a DISC21 folder here (every machine needs the same data path)")
    try:
        same = Path(job["probe"]).read_text() == job["token"]
    except OSError:
        same = False
    if not same:
        problems.append(f"outputs: {job['outputs']} is not the driver's folder here (it must be shared storage: "
                        "the extraction's shards and the checkpoints are read across machines)")
    if job["tracking"] != tracking_fingerprint():
        problems.append("MLFLOW_TRACKING_URI differs from machine 0's (every machine must use the same store)")
    return problems


def join(rdzv_endpoint: str, node_rank: int, timeout_s: float = 900.0, step_env: dict[str, str] | None = None) -> int:
    """Serve machine 0's job as node ``node_rank``: run every step it announces until it says stop.

    ``step_env``: the steps' environment (default: this process's)."""
    if node_rank < 1:
        raise ConfigError("node_rank", f"machine 0 runs `isc main`; joined machines are 1, 2, ..., got {node_rank}")
    store = _client(rdzv_endpoint, timeout_s)
    try:
        store.wait(["job"], timedelta(seconds=timeout_s))
        job = json.loads(store.get("job").decode())
    except (RuntimeError, OSError) as exc:
        raise JoinError(f"rdzv_endpoint: machine 0 published no job within {timeout_s:.0f} s: {exc}") from None
    if node_rank >= job["nnodes"]:
        raise ConfigError("node_rank", f"the job at {rdzv_endpoint} has {job['nnodes']} machines (0..{job['nnodes'] - 1}), "
                                       f"got {node_rank}")
    problems = _check_job(job)
    store.set(f"join/{node_rank}", json.dumps({"host": socket.gethostname(), "problems": problems}))
    if problems:
        raise JoinError(f"node_rank {node_rank} cannot take part: " + "; ".join(problems))
    log.info("node %d of %d joined the job at %s", node_rank, job["nnodes"], rdzv_endpoint)
    i = 0
    while True:
        step = _next_step(store, i, rdzv_endpoint)
        if step.get("stop"):
            store.set(f"done/{i}/{node_rank}", json.dumps({"rc": 0}))
            log.info("machine 0 ended the job (%s)", "finished" if step.get("ok") else "failed")
            return 0 if step.get("ok") else 1
        rc = _run_step(step, job, node_rank, os.environ if step_env is None else step_env,
                       watch=lambda i=i: _ended_meanwhile(store, i, rdzv_endpoint))
        store.set(f"done/{i}/{node_rank}", json.dumps({"rc": rc}))
        i += 1


def _ended_meanwhile(store, i: int, endpoint: str) -> bool:
    """While step ``i`` runs here: did machine 0 end the job (its own part of the step failed)? Raises when
    machine 0 is gone, so this machine's ranks are ended instead of waiting out a collective's timeout."""
    try:
        if not store.check([f"step/{i + 1}"]):
            return False
        return bool(json.loads(store.get(f"step/{i + 1}").decode()).get("stop"))
    except (RuntimeError, OSError):
        raise JoinError(f"machine 0's `isc main` at {endpoint} went away during a step; this machine's part was "
                        "ended") from None


def _next_step(store, i: int, endpoint: str) -> dict[str, Any]:
    """Wait for step ``i`` -- hours may pass while machine 0 evaluates or tunes alone."""
    while True:
        try:
            if store.check([f"step/{i}"]):
                return json.loads(store.get(f"step/{i}").decode())
        except (RuntimeError, OSError):
            raise JoinError(f"machine 0's `isc main` at {endpoint} went away before it ended the job") from None
        time.sleep(POLL_S)


def _run_step(step: dict[str, Any], job: dict[str, Any], node_rank: int, base_env, watch) -> int:
    """Run one announced step as this machine's part; ``watch()`` is polled while it runs (True: end it)."""
    module, args = step.get("module"), step.get("args")
    if module not in JOINABLE_MODULES or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise JoinError(f"refusing a step that is not one of {', '.join(JOINABLE_MODULES)} with plain arguments: "
                        f"{str(module)[:80]!r}")
    cmd = [sys.executable, "-m", "isc.launch", "--nproc-per-node", str(job["nproc_per_node"]),
           "--nnodes", str(job["nnodes"]), "--node-rank", str(node_rank),
           "--rdzv-endpoint", job["rdzv_endpoint"], "-m", module, *args]
    env = {k: v for k, v in base_env.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_PARENT_RUN_ID")}
    log.info("node %d: starting %s", node_rank, module)
    # its own session: a signal to `isc join` ends the step's whole tree (torchrun, ranks, loader workers)
    # from the project folder, as `mlflow run` does: the MLproject's relative paths (configs) are relative to it
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    try:
        while True:
            try:
                return proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                if watch():
                    log.info("node %d: machine 0 ended the job during %s; ending this machine's part", node_rank,
                             module)
                    _end_group(proc)
                    return proc.returncode
    finally:
        if proc.poll() is None:
            _end_group(proc)


def _end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
