"""Channels: how one party's frames reach another. The only I/O boundary.

A :class:`Endpoint` sends a labelled frame and receives the frame with a given
label; frames that arrive before anyone waits for them are buffered by label
(MPyC-style), so interleaved protocol steps never mix messages. Every
endpoint counts the bytes and frames it sends. :class:`MemoryLink` joins two
endpoints in-process with the exact serialized frames a network would carry;
:class:`MemoryNetwork` joins whole parties (their services run unchanged in-process); the MQTT
transport (``transport.py``) implements the same interface, and netsim wraps an endpoint to shape it.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .errors import ConnectionLost, ProtocolError, UsageError

Frame = bytes | memoryview  # a received frame: bytes, or a view into the decrypted buffer (no copy)


@dataclass
class Counters:
    """Bytes and frames sent by one endpoint (resettable)."""

    bytes_sent: int = 0
    frames_sent: int = 0
    bytes_received: int = 0
    log: list[tuple[str, int]] = field(default_factory=list)

    def reset(self) -> None:
        self.bytes_sent = 0
        self.frames_sent = 0
        self.bytes_received = 0
        self.log.clear()


class Endpoint(ABC):
    """One party's end of a link to one peer. :meth:`send` counts every frame once, as the bytes it
    occupies on the link (what :meth:`_send` reports); subclasses only move bytes."""

    def __init__(self) -> None:
        self.counters = Counters()

    async def send(self, label: str, frame: bytes) -> None:
        n = await self._send(label, frame)
        self.counters.bytes_sent += n
        self.counters.frames_sent += 1
        self.counters.log.append((label, n))

    @abstractmethod
    async def _send(self, label: str, frame: bytes) -> int:
        """Move one frame; returns the bytes it took on the link."""

    @abstractmethod
    async def recv(self, label: str, timeout: float | None = None) -> Frame: ...

    def wire_size(self, label: str, frame: Frame) -> int:
        """Bytes this frame occupies on the link (the transport adds its own framing)."""
        return len(frame)


class _Inbox:
    """Frames by label; early arrivals are buffered, bounded in count, bytes and age (a peer or broker
    cannot grow a party's memory without limit: past a bound the oldest early frames are dropped)."""

    def __init__(self, max_frames: int = 4096, max_bytes: int = 4 << 30, max_age: float = 900.0) -> None:
        self.early: dict[str, tuple[Frame, float]] = {}
        self.waiting: dict[str, asyncio.Future[Frame]] = {}
        self.closed = False
        self.max_frames, self.max_bytes, self.max_age = max_frames, max_bytes, max_age
        self._bytes = 0
        self.expired = 0  # early frames dropped by the bounds

    def deliver(self, label: str, frame: Frame) -> None:
        fut = self.waiting.pop(label, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
            return
        if label in self.early:
            raise ProtocolError(f"duplicate frame for label {label!r}")
        if len(frame) > self.max_bytes:
            raise ProtocolError(f"frame {label!r} is larger than the early-arrival budget")
        now = time.monotonic()
        self.early[label] = (frame, now)
        self._bytes += len(frame)
        while self.early and (len(self.early) > self.max_frames or self._bytes > self.max_bytes
                              or now - next(iter(self.early.values()))[1] > self.max_age):
            self._drop(next(iter(self.early)))

    def _drop(self, label: str) -> None:
        frame, _ = self.early.pop(label)
        self._bytes -= len(frame)
        self.expired += 1

    def fail_all(self, err: BaseException) -> None:
        """Fail every waiting receive with ``err`` and forget early frames (the peer restarted)."""
        for label in list(self.early):
            self._drop(label)
        for fut in list(self.waiting.values()):
            if not fut.done():
                fut.set_exception(err)

    def fail_waiting(self, err: BaseException) -> None:
        """Fail every waiting receive with ``err`` (early frames stay)."""
        for fut in list(self.waiting.values()):
            if not fut.done():
                fut.set_exception(err)

    async def take(self, label: str, timeout: float | None) -> Frame:
        if label in self.early:
            frame, _ = self.early.pop(label)
            self._bytes -= len(frame)
            return frame
        if self.closed:
            raise ConnectionLost(f"link closed while waiting for {label!r}")
        if label in self.waiting:
            raise ProtocolError(f"two receivers wait for label {label!r}")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.waiting[label] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ConnectionLost(f"no frame {label!r} from peer within {timeout} s") from None
        finally:
            self.waiting.pop(label, None)


Control = asyncio.Queue[tuple[str, str, Frame]]  # (sender, label, frame) of ``ctl:`` frames


class MemoryEndpoint(Endpoint):
    """In-process endpoint: frames go straight into the peer's inbox (``ctl:`` frames into the peer
    party's control queue, when it has one, as the MQTT transport does)."""

    def __init__(self, owner: str = "", control: Control | None = None) -> None:
        super().__init__()
        self.owner, self.control = owner, control
        self.inbox = _Inbox()
        self.peer: MemoryEndpoint | None = None

    async def _send(self, label: str, frame: bytes) -> int:
        peer = self.peer
        if peer is None or peer.inbox.closed:
            raise ConnectionLost("peer endpoint is closed")
        if peer.control is not None and label.startswith("ctl:"):
            peer.control.put_nowait((self.owner, label, frame))
        else:
            peer.inbox.deliver(label, frame)
        return len(frame)

    async def recv(self, label: str, timeout: float | None = None) -> Frame:
        return await self.inbox.take(label, timeout)

    def close(self) -> None:
        self.inbox.closed = True
        for fut in self.inbox.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("link closed"))


class MemoryLink:
    """Two connected in-memory endpoints, ``a`` and ``b``."""

    def __init__(self, a: MemoryEndpoint | None = None, b: MemoryEndpoint | None = None) -> None:
        self.a, self.b = a or MemoryEndpoint(), b or MemoryEndpoint()
        self.a.peer, self.b.peer = self.b, self.a


class MemoryTransport:
    """One party of a :class:`MemoryNetwork`: an endpoint per peer and a control queue (the interface
    of :class:`~blindseg.transport.MqttTransport`)."""

    def __init__(self, me: str, network: MemoryNetwork | None = None) -> None:
        self.me, self.network = me, network
        self.control: Control = asyncio.Queue()
        self.endpoints: dict[str, MemoryEndpoint] = {}

    async def offer(self, frame: bytes, to: list[str]) -> None:
        """A job offer to one of the server0s ``to``, round-robin (what the broker's shared subscription
        does over MQTT)."""
        if self.network is None or not to:
            raise UsageError("this in-memory party is not part of a network")
        n = self.network
        n.offers += 1
        n.transports[sorted(to)[n.offers % len(to)]].control.put_nowait((self.me, "ctl:offer", frame))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for ep in self.endpoints.values():
            ep.close()


class MemoryNetwork:
    """Named parties, every pair joined in memory: the same frames and labels as over MQTT."""

    def __init__(self, parties: tuple[str, ...]) -> None:
        self.transports = {p: MemoryTransport(p, self) for p in parties}
        self.offers = 0
        for i, a in enumerate(parties):
            for b in parties[i + 1:]:
                ta, tb = self.transports[a], self.transports[b]
                link = MemoryLink(MemoryEndpoint(a, ta.control), MemoryEndpoint(b, tb.control))
                ta.endpoints[b], tb.endpoints[a] = link.a, link.b
