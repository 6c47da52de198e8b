"""A TCPStore server that listens on one address only.

torch's own ``TCPStore(host, port, is_master=True)`` binds every interface whatever ``host`` says, which
would listen beyond the address the user configured. :func:`start_store` binds the socket itself and hands
it to the store. The master's job store and the step-cost measurement (:mod:`oobleck.engine.step_costs`) use it.
"""

from __future__ import annotations

import socket
from typing import Any


def start_store(host: str) -> Any:
    """A TCPStore server on a free port of ``host``, listening on that address only. The socket is bound
    here and handed over: the store owns (and closes) it from then on."""
    from torch.distributed import TCPStore

    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
        store = TCPStore(
            host, listener.getsockname()[1], is_master=True, wait_for_workers=False,
            master_listen_fd=listener.fileno(), use_libuv=True,
        )  # fmt: skip
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store closes the descriptor when it is destroyed
    return store
