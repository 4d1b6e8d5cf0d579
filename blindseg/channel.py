"""Channels: how one party's frames reach another. The only I/O boundary.

A :class:`Endpoint` sends a labelled frame and receives the frame with a given
label; frames that arrive before anyone waits for them are buffered by label
(MPyC-style), so interleaved protocol steps never mix messages. Every
endpoint counts the bytes and frames it sends. :class:`MemoryLink` joins two
endpoints in-process with the exact serialized frames a network would carry;
the MQTT transport (``transport.py``) implements the same interface, and netsim wraps
an endpoint to shape it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .errors import ConnectionLost, ProtocolError

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
    """One party's end of a link to one peer."""

    def __init__(self) -> None:
        self.counters = Counters()

    @abstractmethod
    async def send(self, label: str, frame: bytes) -> None: ...

    @abstractmethod
    async def recv(self, label: str, timeout: float | None = None) -> Frame: ...

    def wire_size(self, label: str, frame: Frame) -> int:
        """Bytes this frame occupies on the link (the transport adds its own framing)."""
        return len(frame)


class _Inbox:
    def __init__(self) -> None:
        self.early: dict[str, Frame] = {}
        self.waiting: dict[str, asyncio.Future[Frame]] = {}
        self.closed = False

    def deliver(self, label: str, frame: Frame) -> None:
        fut = self.waiting.pop(label, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        elif label in self.early:
            raise ProtocolError(f"duplicate frame for label {label!r}")
        else:
            self.early[label] = frame

    async def take(self, label: str, timeout: float | None) -> Frame:
        if label in self.early:
            return self.early.pop(label)
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


class MemoryEndpoint(Endpoint):
    """In-process endpoint: frames go straight into the peer's inbox."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox = _Inbox()
        self.peer: MemoryEndpoint | None = None

    async def send(self, label: str, frame: bytes) -> None:
        if self.peer is None or self.peer.inbox.closed:
            raise ConnectionLost("peer endpoint is closed")
        self.counters.bytes_sent += len(frame)
        self.counters.frames_sent += 1
        self.counters.log.append((label, len(frame)))
        self.peer.inbox.deliver(label, frame)

    async def recv(self, label: str, timeout: float | None = None) -> Frame:
        return await self.inbox.take(label, timeout)

    def close(self) -> None:
        self.inbox.closed = True
        for fut in self.inbox.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("link closed"))


class MemoryLink:
    """Two connected in-memory endpoints, ``a`` and ``b``."""

    def __init__(self) -> None:
        self.a, self.b = MemoryEndpoint(), MemoryEndpoint()
        self.a.peer, self.b.peer = self.b, self.a
