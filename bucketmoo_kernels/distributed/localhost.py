"""Process groups on one machine: a free TCP port for ``init_process_group``'s rendezvous.

Used by the demo, the benchmarks and the tests, which spawn their ranks on localhost.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it; a process may still
    take it before the rendezvous binds it, which is the usual, accepted race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
