"""Ports for the fleet's servers: never one an outgoing connection can take before the server binds it."""

import socket

from flotilla.sandbox.procs import _ephemeral_range, free_port


def test_listening_ports_come_from_below_the_ephemeral_range_and_bind():
    lo, hi = _ephemeral_range()
    # hold a few hundred outgoing-style ports (bind(0): the ephemeral range) the way a busy fleet does
    held = [socket.socket() for _ in range(200)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        taken = {s.getsockname()[1] for s in held}
        assert all(lo <= p <= hi for p in taken)
        ports = [free_port() for _ in range(500)]  # a big fleet's worth, none bound yet
        assert len(set(ports)) == len(ports)  # never the same port twice
        assert all(p < lo for p in ports), ports
        assert not taken & set(ports)
        for p in set(ports):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))  # free, as promised
    finally:
        for s in held:
            s.close()
