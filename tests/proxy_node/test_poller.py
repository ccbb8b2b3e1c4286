"""The edge-triggered poller on real socket pairs: what it reports, to whom, and when not."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from proxy_node.poller import READABLE, WRITABLE, Poller


class _Log:
    def __init__(self) -> None:
        self.failures: list[int] = []

    def exception(self, message: str, *, fd: int) -> None:
        self.failures.append(fd)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    yield left, right
    left.close()
    right.close()


async def _settle() -> None:
    """Let the event loop run the poller's dispatch a few times."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_registration_reports_the_current_state(pair: tuple[socket.socket, socket.socket]
                                                      ) -> None:
    left, right = pair
    right.send(b"early")  # before anyone watches
    poller = Poller(asyncio.get_running_loop())
    masks: list[int] = []
    poller.watch(left.fileno(), masks.append)
    await _settle()
    poller.close()
    assert masks, "data that arrived before the watch was not reported"
    assert masks[0] & READABLE and masks[0] & WRITABLE


async def test_one_edge_per_arrival_not_per_byte_left(pair: tuple[socket.socket, socket.socket]
                                                      ) -> None:
    left, right = pair
    poller = Poller(asyncio.get_running_loop())
    masks: list[int] = []
    poller.watch(left.fileno(), masks.append)
    await _settle()
    masks.clear()
    right.send(b"x")
    await _settle()
    assert len(masks) == 1 and masks[0] & READABLE
    await _settle()  # unread data: level-triggered would report it again; edges do not
    assert len(masks) == 1
    right.send(b"y")
    await _settle()
    poller.close()
    assert len(masks) == 2


async def test_redirect_replaces_the_handler(pair: tuple[socket.socket, socket.socket]
                                             ) -> None:
    left, right = pair
    poller = Poller(asyncio.get_running_loop())
    first: list[int] = []
    second: list[int] = []
    with pytest.raises(KeyError):
        poller.redirect(left.fileno(), second.append)  # not watched yet
    poller.watch(left.fileno(), first.append)
    await _settle()
    poller.redirect(left.fileno(), second.append)
    first.clear()
    right.send(b"x")
    await _settle()
    poller.close()
    assert not first and second


async def test_forgotten_sockets_are_not_reported(pair: tuple[socket.socket, socket.socket]
                                                  ) -> None:
    left, right = pair
    poller = Poller(asyncio.get_running_loop())
    masks: list[int] = []
    poller.watch(left.fileno(), masks.append)
    await _settle()
    masks.clear()
    poller.forget(left.fileno())
    right.send(b"x")
    await _settle()
    assert not masks
    poller.watch(left.fileno(), masks.append)  # still registered in the kernel: no error
    await _settle()
    masks.clear()
    right.send(b"y")
    await _settle()
    poller.close()
    assert masks


async def test_a_failing_handler_does_not_lose_the_other_edges() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    log = _Log()
    poller = Poller(asyncio.get_running_loop(), log)
    seen: list[int] = []
    fds = [left.fileno() for left, _right in pairs]

    def broken(mask: int) -> None:
        raise RuntimeError("handler bug")

    try:
        for index, (left, _right) in enumerate(pairs):
            left.setblocking(False)
            fd = left.fileno()
            poller.watch(fd, broken if index == 0 else (lambda mask, fd=fd: seen.append(fd)))
        await _settle()
        seen.clear()
        for _left, right in pairs:
            right.send(b"x")
        await _settle()
    finally:
        poller.close()
        for left, right in pairs:
            left.close()
            right.close()
    assert sorted(seen) == sorted(fds[1:])
    assert fds[0] in log.failures


async def test_a_reused_descriptor_number_is_watched_again() -> None:
    """A socket closed without forget() leaves a stale handler; the next socket that gets the
    same descriptor number must still be registered with the kernel."""
    poller = Poller(asyncio.get_running_loop())
    stale: list[int] = []
    fresh: list[int] = []
    left, right = socket.socketpair()
    number = left.fileno()
    poller.watch(number, stale.append)
    left.close()  # the kernel drops the registration; the poller still has the handler
    right.close()
    left, right = socket.socketpair()
    try:
        if left.fileno() != number:
            left, right = right, left
        assert left.fileno() == number, "the descriptor number was not reused"
        left.setblocking(False)
        poller.watch(number, fresh.append)
        right.send(b"x")
        await _settle()
    finally:
        poller.close()
        left.close()
        right.close()
    assert fresh and fresh[-1] & READABLE
    assert not stale
