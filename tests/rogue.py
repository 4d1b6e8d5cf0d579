"""What a hostile broker can do, through the real sealing and a real Mosquitto: record every message,
and deliver any recorded or crafted message on any topic (drop, reorder, splice, replay).

:class:`Rogue` holds one party's static key (as the tests do: they own the kit) and runs the real
handshake with one peer, so it can produce exactly the sealed chunks that party would send; a hostile
broker could deliver the same bytes by dropping and reordering that party's real chunks."""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from blindseg.crypto import SecureLink, generate_key
from blindseg.transport import seal_chunks, topic_for


class Recorder:
    """Subscribes to everything and keeps (topic, payload) in arrival order."""

    def __init__(self, port: int) -> None:
        self.port, self.seen = port, []  # type: ignore[var-annotated]
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        ready = asyncio.Event()

        async def run() -> None:
            async with aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
                await c.subscribe("#", qos=1)
                ready.set()
                async for m in c.messages:
                    self.seen.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]

        self._task = asyncio.get_running_loop().create_task(run())
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p in self.seen if t == topic]


async def deliver(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish raw messages as the broker would deliver them."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        for topic, payload in messages:
            await c.publish(topic, payload, qos=1)


class Rogue:
    def __init__(self, port: int, deployment: str, me: str, key: X25519PrivateKey, peer: str,
                 peer_key: X25519PublicKey) -> None:
        self.port, self.me, self.peer = port, me, peer
        self.link = SecureLink(key, peer_key, generate_key(), deployment, me, peer)
        self.out, self.inbox = topic_for(deployment, peer, me), topic_for(deployment, me, peer)
        self._client: aiomqtt.Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self.fid = 0

    async def __aenter__(self) -> Rogue:
        c = await self._stack.enter_async_context(
            aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5))
        self._client = c
        await c.subscribe(self.inbox, qos=1)
        await c.publish(self.out, self.link.hello(self.out), qos=1)
        async with asyncio.timeout(15):
            async for m in c.messages:
                payload = bytes(m.payload)  # type: ignore[arg-type]
                if payload[:4] == b"BSH2":
                    _, reply = self.link.accept(self.inbox, payload)
                    if reply:
                        await c.publish(self.out, self.link.hello(self.out), qos=1)
                    break
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def chunks(self, label: str, frame: bytes, chunk: int) -> list[bytearray]:
        self.fid += 1
        return seal_chunks(self.link, self.out, label, self.fid, frame, chunk)

    async def send(self, *payloads: bytes | bytearray) -> None:
        assert self._client is not None
        for p in payloads:
            await self._client.publish(self.out, bytes(p), qos=1)
