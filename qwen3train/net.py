"""A free TCP port on this machine (no torch: the launcher wrapper uses it before any rank starts)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
