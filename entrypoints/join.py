"""``isc join``: this machine takes part in an ``isc main`` driven from machine 0 (see isc/nodes.py).

    # machine 0 (8 GPUs): the main job, 2 machines
    bash scripts/main.sh -P profile=full -P data=/shared/disc21 -P nproc_per_node=8 -P nnodes=2 \\
        -P rdzv_endpoint=node0.internal:29400
    # machine 1: the same data and outputs (shared storage), the same MLFLOW_TRACKING_URI
    isc join --rdzv-endpoint node0.internal:29400 --node-rank 1

It runs every training stage and extraction machine 0 announces, as node ``--node-rank``, and exits when
the job ends (0 if it finished). No MLflow run is opened here: global rank 0 on machine 0 logs.
"""

from __future__ import annotations

import os

from isc.cliutil import Parser, positive_float, positive_int
from isc.nodes import join


def build_parser() -> Parser:
    p = Parser(prog="isc join", description=__doc__.split("\n\n")[0])
    p.add_argument("--rdzv-endpoint", required=True,
                   help="machine 0's HOST:PORT, as given to its main job (this machine connects to PORT + 1)")
    p.add_argument("--node-rank", type=positive_int, required=True, help="this machine's number, 1..nnodes-1")
    p.add_argument("--timeout", type=positive_float, default=900.0,
                   help="seconds to wait for machine 0's job to appear (default 900)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch's C++ layer prints a stack for a store whose server went away; the one-line error says it all.
    # Read when torch loads, so set here; the steps this machine starts get the environment as it was.
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"

    return join(args.rdzv_endpoint, args.node_rank, args.timeout, step_env=_restored(before))


def _restored(before: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    return env if before is None else {**env, "TORCH_CPP_LOG_LEVEL": before}


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.join")
