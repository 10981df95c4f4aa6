"""``torchrun`` whose rendezvous stores listen on 127.0.0.1 only (``python -m isc.local_torchrun ...``).

Why: torchrun's c10d stores (``--standalone`` or ``--rdzv-endpoint 127.0.0.1:PORT`` alike) are
``TCPStore`` servers, and PyTorch binds them to every interface (``[::]``) whatever host is given --
an unauthenticated key-value store reachable from the network while a one-machine job trains. This
wrapper hands each store it hosts a socket already bound to 127.0.0.1 (``master_listen_fd``) and then
runs the real ``torch.distributed.run``; arguments are torchrun's. One machine only: for several nodes
run plain ``torchrun`` with a reachable rendezvous endpoint and firewall it (docs/operations.md).
"""

from __future__ import annotations

import socket
import sys

LOOPBACK = "127.0.0.1"


def _loopback_store_class():
    import torch.distributed as dist

    base = dist.TCPStore

    class LoopbackTCPStore(base):  # type: ignore[misc,valid-type]
        """A TCPStore whose server side listens on 127.0.0.1 instead of every interface."""

        def __init__(self, host_name, port, world_size=None, is_master=False, *args, **kwargs):
            if is_master and kwargs.get("master_listen_fd") is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((LOOPBACK, int(port)))  # port 0: the OS picks a free one, as torchrun would
                sock.listen(128)
                port = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.detach()
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)

    return LoopbackTCPStore


def install() -> None:
    """Make every torchrun code path that hosts a store create :class:`LoopbackTCPStore` ones."""
    import torch.distributed as dist
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_backend
    import torch.distributed.rendezvous as rendezvous

    store = _loopback_store_class()
    for module in (dist, rendezvous, c10d_backend, static_backend):
        module.TCPStore = store


def main(argv: list[str] | None = None) -> int:
    install()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
