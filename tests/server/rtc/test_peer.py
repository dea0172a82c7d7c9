"""streamdiff.server.rtc.peer: the port range's binds on real UDP sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest

from streamdiff.server.rtc.peer import MAX_BIND_TRIES, NoFreePort, gather_on


def _taken_range(count: int) -> tuple[tuple[int, int], list[socket.socket]]:
    """``count`` consecutive UDP ports of 127.0.0.1, every one bound here (so taken for anyone else)."""
    for first in range(41000, 60000 - count, 997):
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return (first, first + count - 1), held
        except OSError:
            for sock in held:
                sock.close()
    pytest.skip(f"no {count} consecutive free UDP ports on 127.0.0.1")


def _counting_binds(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Record the port of every datagram bind ``loop`` attempts (installed below the range's own wrapper)."""
    ports: list[int] = []
    original = loop.create_datagram_endpoint

    async def counted(factory, local_addr=None, **kwargs):
        ports.append(local_addr[1] if local_addr else -1)
        return await original(factory, local_addr=local_addr, **kwargs)

    loop.create_datagram_endpoint = counted  # type: ignore[method-assign]
    return ports


@pytest.mark.parametrize("count", [8, MAX_BIND_TRIES + 136])
def test_a_full_port_range_costs_a_bounded_number_of_binds(count: int) -> None:
    """Every port of the range held by another socket: NoFreePort, after every port (a small range) or after
    ``MAX_BIND_TRIES`` distinct ports of it (a large one), never a bind outside the range."""
    (first, last), held = _taken_range(count)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        binds = _counting_binds(loop)
        with gather_on(("127.0.0.1",), (first, last)):
            with pytest.raises(NoFreePort) as error:
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        assert f"--rtc-port-range {first}-{last}" in str(error.value)
        return binds

    try:
        binds = asyncio.run(main())
    finally:
        for sock in held:
            sock.close()
    assert len(binds) == len(set(binds)) == min(count, MAX_BIND_TRIES)
    assert all(first <= port <= last for port in binds)


def test_a_free_port_in_the_range_is_found_and_used() -> None:
    (first, last), held = _taken_range(8)
    free = held.pop(5)
    free.close()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        with gather_on(("127.0.0.1",), (first, last)):
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                               local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        transport.close()
        return port

    try:
        assert asyncio.run(main()) == first + 5
    finally:
        for sock in held:
            sock.close()
