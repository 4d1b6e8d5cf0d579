"""A shaped TCP relay: one party's access link to the broker, played on loopback.

Every party connects to the broker through its own :class:`ShapedRelay`; each byte the relay forwards,
in either direction, leaves after the bytes before it (``size * 8 / bandwidth``, FIFO) and arrives
``latency`` later. A message from server0 to server1 thus crosses server0's link, the broker (a real
Mosquitto) and server1's link, as in a deployment with the broker at some site; which links are
slow is the placement (:func:`netsim.placement`). Waiting is ``asyncio.sleep`` (no spin).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from . import PROFILES, Profile, _sleep_until


class ShapedRelay:
    """Listens on a free loopback port and relays each connection to ``target`` through ``profile``
    (changeable between jobs: ``relay.profile = ...``)."""

    def __init__(self, target_port: int, profile: Profile = PROFILES["none"], host: str = "127.0.0.1",
                 listen: str | None = None) -> None:
        """``listen``: the address to accept on (default ``host``, the target's; e.g. this side of a
        namespace's veth, :mod:`netsim.netns`)."""
        self.target = (host, target_port)
        self.host = listen or host
        self.profile = profile
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> ShapedRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_w), (up_r, writer)):
            t = asyncio.get_running_loop().create_task(self._direction(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _direction(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.get_running_loop().create_task(self._deliver(queue, dst))
        free_at = 0.0
        try:
            while data := await src.read(1 << 16):
                prof = self.profile
                now = time.perf_counter()
                free_at = max(now, free_at) + prof.transfer_seconds(len(data))
                queue.put_nowait((free_at + prof.latency, data))
            queue.put_nowait((0.0, b""))
            await deliver
        except (ConnectionError, OSError):  # a side hung up: the link goes down, as a real one would
            pass
        finally:
            deliver.cancel()
            dst.close()

    @staticmethod
    async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        while True:
            at, data = await queue.get()
            if not data:
                return
            await _sleep_until(at)
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                return
