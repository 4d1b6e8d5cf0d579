"""MQTT transport: the one module where bytes leave a party.

One :class:`MqttTransport` per party process holds one MQTT v5 connection
(aiomqtt, TCP_NODELAY, QoS 1) and subscribes only to
``blindseg/<deployment>/<me>/+`` -- what is addressed to it. A frame for peer P
travels on ``blindseg/<deployment>/<P>/<me>``, cut into chunks of at most
``chunk`` bytes, each sealed with the pair's AES-256-GCM direction key
(:mod:`blindseg.crypto`); the broker sees ciphertext, sizes and timing only.

Chunk plaintext: ``u16 label length | label | u32 chunk index | u32 chunk count | data``.
Chunks of a frame are published without waiting for each other (pipelined);
MQTT keeps one publisher's messages in order on a topic, so reassembly is a
running list per label. A frame is delivered to the receiving
:class:`MqttEndpoint`'s inbox by label (early arrivals buffered); frames whose
label starts with ``ctl:`` go to :attr:`MqttTransport.control` for the role's
service loop. Anything that fails to authenticate, replays, is malformed or
exceeds the size limit is dropped with a logged reason; it never stops the
reader. Bytes and frames are counted on the sealed messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import urlparse

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .channel import Control, Endpoint, Frame, _Inbox
from .crypto import OVERHEAD, Opener, Sealer
from .errors import ConnectionLost, ProtocolError, UsageError

log = logging.getLogger("blindseg.transport")

CHUNK = 1 << 20
MAX_FRAME = 1 << 30


@dataclass
class BrokerAddress:
    """Where the broker is: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    mqtt5: bool = True  # amqtt 0.12 speaks MQTT 3.1.1 only

    @staticmethod
    def parse(url: str, username: str | None = None, password: str | None = None,
              ca_file: str | None = None, mqtt5: bool = True) -> BrokerAddress:
        """``mqtt://host:port`` / ``mqtts://host:port``; ``mqtt311://`` forces MQTT 3.1.1 (amqtt)."""
        if url.startswith("mqtt311://"):
            url, mqtt5 = "mqtt://" + url[len("mqtt311://"):], False
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise UsageError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
        port = u.port or (8883 if u.scheme == "mqtts" else 1883)
        return BrokerAddress(u.hostname, port, u.scheme == "mqtts", username or u.username,
                             password or u.password, ca_file, mqtt5)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx


def topic_for(deployment: str, to: str, sender: str) -> str:
    return f"blindseg/{deployment}/{to}/{sender}"


class MqttTransport:
    """One party's connection: sealing, chunking, reconnect with backoff, per-peer endpoints."""

    def __init__(self, deployment: str, me: str, key: X25519PrivateKey, peers: dict[str, X25519PublicKey],
                 broker: BrokerAddress, chunk: int = CHUNK, max_frame: int = MAX_FRAME,
                 connect_timeout: float = 10.0) -> None:
        self.deployment, self.me, self.broker = deployment, me, broker
        self.chunk, self.max_frame, self.connect_timeout = chunk, max_frame, connect_timeout
        self.endpoints = {
            p: MqttEndpoint(self, p, Sealer(key, pk, deployment, me, p), Opener(key, pk, deployment, p, me))
            for p, pk in peers.items()
        }
        self.control: Control = asyncio.Queue()
        self._mqtt_log = logging.getLogger("blindseg.transport.mqtt")
        if self._mqtt_log.level == logging.NOTSET:  # aiomqtt warns on every burst of pipelined publishes
            self._mqtt_log.setLevel(logging.ERROR)
        self.rejected: list[str] = []  # reasons, for tests and logs
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def endpoint(self, peer: str) -> MqttEndpoint:
        try:
            return self.endpoints[peer]
        except KeyError:
            raise UsageError(f"no key configured for peer {peer!r}") from None

    async def start(self) -> None:
        """Connect (retrying with backoff in the background) and wait for the first connection."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout)
        except TimeoutError:
            await self.close()
            raise ConnectionLost(f"cannot reach the MQTT broker at {self.broker.host}:{self.broker.port} "
                                 f"within {self.connect_timeout} s") from None

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for ep in self.endpoints.values():
            ep.close()

    async def __aenter__(self) -> MqttTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, username=self.broker.username, password=self.broker.password,
                    identifier=f"{self.deployment}-{self.me}-{id(self):x}", logger=self._mqtt_log, protocol=aiomqtt.ProtocolVersion.V5 if self.broker.mqtt5 else aiomqtt.ProtocolVersion.V311,
                    tls_context=self.broker.tls_context(), max_inflight_messages=64,
                    socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),), timeout=self.connect_timeout,
                ) as client:
                    await client.subscribe(topic_for(self.deployment, self.me, "+"), qos=1)
                    self._client = client
                    self._connected.set()
                    if delay > 0.1:
                        log.info("%s: reconnected to the broker", self.me)
                    delay = 0.1
                    async for msg in client.messages:
                        self._on_message(str(msg.topic), msg.payload)  # type: ignore[arg-type]
            except (aiomqtt.MqttError, OSError, TimeoutError) as e:
                if self._closing:
                    return
                log.warning("%s: broker connection lost (%s); reconnecting in %.1f s", self.me, e, delay)
            except Exception:
                log.exception("%s: transport error; reconnecting in %.1f s", self.me, delay)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        sender = parts[3] if len(parts) == 4 else ""
        ep = self.endpoints.get(sender)
        try:
            if ep is None or parts[:3] != ["blindseg", self.deployment, self.me]:
                raise ProtocolError(f"message on unexpected topic {topic!r}")
            ep._receive(topic, bytes(payload))
        except ProtocolError as e:
            reason = f"dropped message from {sender or '?'}: {e}"
            self.rejected.append(reason)
            log.warning("%s: %s", self.me, reason)

    async def publish(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout)
        except TimeoutError:
            raise ConnectionLost(f"not connected to the broker for {self.connect_timeout} s") from None
        client = self._client
        if client is None:
            raise ConnectionLost("broker connection dropped")
        try:
            await client.publish(topic, payload, qos=1, timeout=math.inf)
        except aiomqtt.MqttError as e:
            raise ConnectionLost(f"publish failed: {e}") from None


class MqttEndpoint(Endpoint):
    """This party's link to one peer over the shared transport."""

    def __init__(self, transport: MqttTransport, peer: str, sealer: Sealer, opener: Opener) -> None:
        super().__init__()
        self.t, self.peer = transport, peer
        self._sealer, self._opener = sealer, opener
        self.inbox = _Inbox()
        self._partial: dict[str, list[memoryview]] = {}
        self._out = topic_for(transport.deployment, peer, transport.me)
        self._lock = asyncio.Lock()

    async def _send(self, label: str, frame: bytes) -> int:
        lab = label.encode()
        if len(frame) > self.t.max_frame:
            raise ProtocolError(f"frame {label!r} is {len(frame)} bytes, over the {self.t.max_frame}-byte limit")
        view = memoryview(frame)
        n = max(1, -(-len(frame) // self.t.chunk))
        msgs = []
        for k in range(n):
            head = struct.pack(">H", len(lab)) + lab + struct.pack(">II", k, n)
            msgs.append(self._sealer.seal(self._out, head, view[k * self.t.chunk:(k + 1) * self.t.chunk]))
        async with self._lock:  # one frame's chunks stay contiguous on the topic
            await asyncio.gather(*(self.t.publish(self._out, m) for m in msgs))
        return sum(len(m) for m in msgs)

    async def recv(self, label: str, timeout: float | None = None) -> Frame:
        return await self.inbox.take(label, timeout)

    def wire_size(self, label: str, frame: Frame) -> int:
        n = max(1, -(-len(frame) // self.t.chunk))
        return len(frame) + n * (OVERHEAD + 10 + len(label.encode()))

    def _receive(self, topic: str, message: bytes) -> None:
        body = self._opener.open(topic, message)
        self.counters.bytes_received += len(message)
        if len(body) < 10:
            raise ProtocolError("chunk is too short")
        (ll,) = struct.unpack(">H", body[:2])
        label = bytes(body[2:2 + ll]).decode("utf-8", "replace")
        k, n = struct.unpack(">II", body[2 + ll:10 + ll])
        data = body[10 + ll:]  # a view: the only copy is the join below (none for one-chunk frames)
        parts = self._partial.setdefault(label, [])
        if k != len(parts) or n == 0 or k >= n or n * self.t.chunk > self.t.max_frame + self.t.chunk:
            self._partial.pop(label, None)
            raise ProtocolError(f"chunk {k}/{n} of {label!r} is out of order or over the size limit")
        parts.append(data)
        if k + 1 < n:
            return
        chunks = self._partial.pop(label)
        if label.startswith("ctl:"):
            self.t.control.put_nowait((self.peer, label, b"".join(chunks)))
        else:
            self.inbox.deliver(label, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self) -> None:
        self.inbox.closed = True
        for fut in self.inbox.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(f"link to {self.peer} closed"))
