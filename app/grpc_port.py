"""GRPC_PORT's guard in the gunicorn master, importing nothing of gRPC (app/grpc_server.py
says why the master must not start gRPC, and why every worker binds with SO_REUSEPORT)."""

from __future__ import annotations

import socket


class PortTaken(RuntimeError):
    """gunicorn prints a RuntimeError from the master's start as "Error: ..." and exits 1."""


def check_port_free(port: int) -> None:
    """Raise PortTaken while any process listens on ``port``: a plain bind (no
    SO_REUSEPORT) fails then, whether the holder set SO_REUSEPORT or not, so a second
    server cannot silently share the port with the workers of a first."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as err:
            raise PortTaken(f"GRPC_PORT {port} is in use ({err.strerror}): another server "
                            "holds it; choose another, or 0 to turn gRPC off") from None
