"""MQTT transport: the one module where bytes leave a party.

One :class:`MqttTransport` per party process holds one MQTT v5 connection
(aiomqtt, TCP_NODELAY, QoS 1) and subscribes only to
``blindseg/<deployment>/<me>/+`` -- what is addressed to it. A frame for peer P
travels on ``blindseg/<deployment>/<P>/<me>``. On every (re)connect the transport
sends each peer a hello (:mod:`blindseg.crypto`: per-run ephemeral keys
authenticated by the static ones); a frame is sent only once the peer's session
is known (``handshake_timeout``), so a party that is not running is named at
once. When a peer's new run appears, waits on the old run's frames fail at once
("server1 restarted") instead of running into a round timeout.

A frame is cut into chunks of at most ``chunk`` bytes, each sealed on its own::

    chunk plaintext = u16 label length | label | u64 frame id | u32 index | u32 count | u64 frame length | data

so every chunk is bound to its frame (ids increase per session): chunks of two
frames never splice, a shortened frame never completes, and the last chunk must
bring exactly the announced length. One sender's frames go out contiguously, so
a receiver holds at most one partial frame per peer (bounded bytes, dropped when
a new frame starts or after ``partial_age`` seconds). Chunks are published
without waiting for each other (pipelined); MQTT keeps one publisher's messages
in order on a topic. Frames whose label starts with ``ctl:`` go to
:attr:`MqttTransport.control` for the role's service loop, others to the
endpoint's inbox by label. Anything that fails to authenticate, replays, is
malformed or exceeds a limit is dropped with a logged reason
(:attr:`MqttTransport.rejected`); it never stops the reader.

Several server pairs: a data owner offers a job on ``blindseg/<deployment>/offers/<tenant>``
(:meth:`MqttTransport.offer`: one sealed copy per pair's server0, keyed by the static DH of the two
identities, so only those can read it and only that tenant can have written it); every server0 holds
the MQTT v5 shared subscription ``$share/<group>/blindseg/<deployment>/offers/+``, so the broker
hands each offer to exactly one of them (``offer_group``). It reaches that server's control queue as
``ctl:offer`` from the tenant; the pair then claims the job over its E2E link. The group name is a
secret of the server0s' configs: Mosquitto lets any login join a shared group (its ACL only stops
the delivery), and a member that may not read would swallow its turn of the offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import msgpack
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .background import spawn
from .channel import Control, Endpoint, Frame, _Inbox
from .crypto import HELLO, OVERHEAD, PresenceSeal, SecureLink
from .errors import ConnectionLost, PeerRestarted, ProtocolError, UnknownSession, UsageError

log = logging.getLogger("blindseg.transport")

CHUNK = 1 << 20
WINDOW = 4 << 20  # unacknowledged bytes a sender may have in flight before it waits for the broker's acks
MAX_FRAME = 1 << 30
CHUNK_HEAD = 2 + 24  # label length + frame id, index, count, frame length (plus the label)


@dataclass
class BrokerAddress:
    """Where the broker is: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
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


def status_topic(deployment: str, service: str = "+", reader: str = "+") -> str:
    """Where ``service``'s presence document for ``reader`` is retained, sealed for that reader
    (:class:`~blindseg.crypto.PresenceSeal`; :mod:`blindseg.health`)."""
    return f"blindseg/{deployment}/{STATUS}/{service}/{reader}"


STATUS = "status"  # the topic level of presence documents (no party may be called this)
OFFERS = "offers"  # the topic level of job offers to the server pairs (no party may be called this either)
MAX_OFFER = 64 << 10


def offer_topic(deployment: str, tenant: str = "+") -> str:
    """Where ``tenant`` offers its jobs to whichever server pair takes them."""
    return f"blindseg/{deployment}/{OFFERS}/{tenant}"


def shared_offers(deployment: str, group: str) -> str:
    """The shared subscription every pair's server0 holds: the broker gives each offer to one of them."""
    return f"$share/{group}/{offer_topic(deployment)}"


def seal_chunks(link: SecureLink, topic: str, label: str, frame_id: int, frame: bytes | memoryview,
                chunk: int = CHUNK) -> list[bytearray]:
    """The sealed chunks of one frame, each bound to it (label, frame id, index, count, length)."""
    lab, view = label.encode(), memoryview(frame)
    n = max(1, -(-len(frame) // chunk))
    head = struct.pack(">H", len(lab)) + lab
    return [link.seal(topic, head + struct.pack(">QIIQ", frame_id, k, n, len(frame)), view[k * chunk:(k + 1) * chunk])
            for k in range(n)]


def _fatal_reason(e: BaseException, broker: BrokerAddress) -> str | None:
    """Why a connection failed, when retrying cannot help (the broker refused the login, or its TLS
    certificate does not verify); None for a transient failure."""
    where = f"the MQTT broker at {broker.host}:{broker.port}"
    chain = [e, e.__cause__, e.__context__]
    text = " ".join(str(x) for x in chain if x is not None)
    cert = next((x for x in chain if isinstance(x, ssl.SSLCertVerificationError)), None)
    if cert is not None or "CERTIFICATE_VERIFY_FAILED" in text:
        why = cert.verify_message if cert is not None else text.split("certificate verify failed:")[-1].split("(")[0]
        return (f"{where}: its TLS certificate does not verify ({why.strip()}) against ca_file "
                f"{broker.ca_file or '(system CAs)'}: check ca_file and the broker's host name")
    if any(isinstance(x, ssl.SSLError) for x in chain) or "WRONG_VERSION_NUMBER" in text:
        return f"{where}: TLS failed ({text.strip()[:120]}): is it a TLS listener (mqtts://) and ca_file right?"
    if isinstance(e, aiomqtt.MqttCodeError) and any(
            k in text for k in ("Not authorized", "Bad user name or password", "not authorised", "Bad username")):
        return (f"{where} refused the login of user {broker.username!r} ({text.strip()}): check username and "
                "password_file in this party's config, and the broker's password file and ACL")
    return None


class MqttTransport:
    """One party's connection: handshakes, sealing, chunking, reconnect with backoff, per-peer endpoints."""

    def __init__(self, deployment: str, me: str, key: X25519PrivateKey, peers: dict[str, X25519PublicKey],
                 broker: BrokerAddress, chunk: int = CHUNK, max_frame: int = MAX_FRAME,
                 connect_timeout: float = 10.0, handshake_timeout: float = 30.0, partial_age: float = 120.0,
                 max_skew: float = 5.0, offer_group: str = "") -> None:
        self.deployment, self.me, self.broker = deployment, me, broker
        self.offer_group = offer_group  # a pair's server0: the shared subscription of job offers it joins
        self.chunk, self.max_frame, self.connect_timeout = chunk, max_frame, connect_timeout
        self.handshake_timeout, self.partial_age, self.max_skew = handshake_timeout, partial_age, max_skew
        self._ephemeral = X25519PrivateKey.generate()  # this run's; never stored
        self.endpoints = {
            p: MqttEndpoint(self, p, SecureLink(key, pk, self._ephemeral, deployment, me, p))
            for p, pk in peers.items()
        }
        self.control: Control = asyncio.Queue()
        self._mqtt_log = logging.getLogger("blindseg.transport.mqtt")
        if self._mqtt_log.level == logging.NOTSET:  # aiomqtt warns on every burst of pipelined publishes
            self._mqtt_log.setLevel(logging.ERROR)
        self.rejected: list[str] = []  # reasons, for tests and logs (the last 1000)
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None  # resolved when the current connection ends
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._ever_connected = False
        self._fatal: str | None = None
        self._failed = asyncio.Event()
        # presence (services): a document per reader (every peer), sealed for it, published retained every
        # `presence_interval` s, and a goodbye on close; a reader that hears nothing new says so
        self.presence: Callable[[str], dict[str, Any]] | None = None
        self.presence_interval = 2.0
        self._seals = {p: PresenceSeal(key, pk, deployment, me, p) for p, pk in peers.items()}
        # peers' presence for this party: when each was last heard (fresh documents only), and a goodbye
        self._read_seals = {p: PresenceSeal(key, pk, deployment, p, me) for p, pk in peers.items()}
        self._key, self._peer_keys = key, peers  # job offers: seals made when first needed
        self._offer_seals: dict[tuple[str, str], PresenceSeal] = {}
        self._heard: dict[str, float] = {}
        self._goodbye: dict[str, str] = {}
        self._heard_interval: dict[str, float] = {}
        # pipelined publishes (frames): in flight -> bytes; a round does not wait for its own acks
        self._inflight: dict[asyncio.Future[Any], int] = {}
        self._inflight_bytes = 0

    def endpoint(self, peer: str) -> MqttEndpoint:
        try:
            return self.endpoints[peer]
        except KeyError:
            raise UsageError(f"no key configured for peer {peer!r}") from None

    async def start(self) -> None:
        """Connect (retrying with backoff in the background) and wait for the first connection."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_socket_teardown_handler(loop.get_exception_handler()))
        self._task = loop.create_task(self._run())
        waits = [asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._failed.wait())]
        try:
            await asyncio.wait(waits, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._fatal is not None:
            await self.close()
            raise UsageError(self._fatal)
        if not self._connected.is_set():
            await self.close()
            raise ConnectionLost(f"cannot reach the MQTT broker at {self.broker.host}:{self.broker.port} "
                                 f"within {self.connect_timeout} s") from None

    async def _publish_presence(self, client: aiomqtt.Client, doc: Callable[[str], dict[str, Any]]) -> None:
        """One sealed, retained document per reader."""
        for reader, seal in self._seals.items():
            topic = status_topic(self.deployment, self.me, reader)
            await client.publish(topic, seal.seal(topic, json.dumps(doc(reader)).encode()), qos=1, retain=True)

    async def _announce(self, client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
        """Publish the presence documents every ``presence_interval`` s while connected."""
        while not lost.done() and self.presence is not None:
            try:
                await asyncio.wait_for(self._publish_presence(client, self.presence), self.presence_interval * 5)
            except (aiomqtt.MqttError, TimeoutError) as e:
                log.debug("%s: presence not published (%s)", self.me, e)
            await asyncio.wait([lost], timeout=self.presence_interval)

    async def goodbye(self, doc: dict[str, Any]) -> None:
        """Retain ``doc`` (up: false, with the reason) as this service's last word; best effort, 2 s."""
        client = self._client
        if client is None:
            return
        self.presence = None  # no document after the goodbye
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(self._publish_presence(client, lambda reader: doc), 2.0)

    async def close(self) -> None:
        self._closing = True
        for t in [self._task, *self._tasks]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        for ep in self.endpoints.values():
            ep.close()

    async def __aenter__(self) -> MqttTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Any) -> None:
        spawn(self._tasks, coro, log, f"{self.me}: transport task")

    async def _run(self) -> None:
        delay = 0.1
        while not self._closing:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, username=self.broker.username, password=self.broker.password,
                    identifier=f"{self.deployment}-{self.me}-{id(self):x}", logger=self._mqtt_log,
                    protocol=aiomqtt.ProtocolVersion.V5 if self.broker.mqtt5 else aiomqtt.ProtocolVersion.V311,
                    tls_context=self.broker.tls_context(), max_inflight_messages=64,
                    socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),), timeout=self.connect_timeout,
                ) as client:
                    await client.subscribe([(topic_for(self.deployment, self.me, "+"), 1),  # inbox; presence for us
                                            (status_topic(self.deployment, "+", self.me), 1),
                                            *([(shared_offers(self.deployment, self.offer_group), 1)]
                                              if self.offer_group and self.broker.mqtt5 else [])])
                    self._client, self._lost = client, lost
                    self._connected.set()
                    self._ever_connected = True
                    if delay > 0.1:
                        log.info("%s: reconnected to the broker", self.me)
                    delay = 0.1
                    for ep in self.endpoints.values():  # peers may have restarted while we were away
                        self._spawn(ep.send_hello())
                    if self.presence is not None:
                        self._spawn(self._announce(client, lost))
                    async for msg in client.messages:
                        if str(msg.topic).startswith(offer_topic(self.deployment, "")):
                            self._on_offer(str(msg.topic), msg.payload)  # type: ignore[arg-type]
                        elif str(msg.topic).count("/") == 4:
                            self._on_presence(str(msg.topic), msg.payload, msg.retain)  # type: ignore[arg-type]
                        else:
                            self._on_message(str(msg.topic), msg.payload)  # type: ignore[arg-type]
            except (aiomqtt.MqttError, OSError, TimeoutError) as e:
                if self._closing:
                    return
                fatal = _fatal_reason(e, self.broker)
                if fatal is not None:
                    log.error("%s: %s", self.me, fatal)
                    if not self._ever_connected:  # a wrong password or CA never heals by retrying: say so now
                        self._fatal = fatal
                        self._failed.set()
                        return
                log.warning("%s: broker connection lost (%s); reconnecting in %.1f s", self.me, e, delay)
            except Exception:
                log.exception("%s: transport error; reconnecting in %.1f s", self.me, delay)
            finally:
                self._connected.clear()
                self._client = None
                if not lost.done():
                    lost.set_result(None)
                self._drop_inflight()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_presence(self, topic: str, payload: bytes, retained: bool) -> None:
        """A peer service's presence document for this party: a fresh one says it is alive; a goodbye
        (fresh or retained) that it stopped."""
        parts = topic.split("/")
        seal = self._read_seals.get(parts[3]) if parts[:3] == ["blindseg", self.deployment, STATUS] else None
        if seal is None or parts[4] != self.me:
            return
        try:
            doc = json.loads(seal.open(topic, bytes(payload)))
        except (ProtocolError, ValueError, TypeError):
            self.reject(f"dropped presence document on {topic!r}: it does not authenticate")
            return
        peer = parts[3]
        if not isinstance(doc, dict):
            return
        if not doc.get("up"):
            self._goodbye[peer] = str(doc.get("reason", "stopped"))
        elif not retained:
            self._heard[peer] = time.monotonic()
            self._goodbye.pop(peer, None)
            if isinstance(doc.get("interval"), int | float):
                self._heard_interval[peer] = float(doc["interval"])

    def _offer_seal(self, writer: str, reader: str) -> PresenceSeal:
        other = reader if writer == self.me else writer
        k = (writer, reader)
        if k not in self._offer_seals:
            self._offer_seals[k] = PresenceSeal(self._key, self._peer_keys[other], self.deployment, writer, reader,
                                                "offer")
        return self._offer_seals[k]

    async def offer(self, frame: bytes, to: list[str]) -> None:
        """Publish a job offer (an encoded :class:`~blindseg.messages.Offer`) sealed for each of the
        server0s ``to``; the broker hands it to one of them. Waits for the broker's acknowledgement."""
        if not self.broker.mqtt5:
            raise UsageError("several server pairs need an MQTT v5 broker with shared subscriptions (Mosquitto 2); "
                             f"{self.broker.host}:{self.broker.port} is spoken to in MQTT 3.1.1")
        topic = offer_topic(self.deployment, self.me)
        missing = [p for p in to if p not in self._peer_keys]
        if missing:
            raise UsageError(f"no key configured for peer(s) {', '.join(missing)}")
        await self.publish(topic, msgpack.packb({p: self._offer_seal(self.me, p).seal(topic, frame) for p in to}))

    def _on_offer(self, topic: str, payload: bytes) -> None:
        """A tenant's job offer, handed to this server0 by the shared subscription: our sealed copy goes
        to the control queue as ``ctl:offer`` from that tenant."""
        tenant = topic.rsplit("/", 1)[-1]
        try:
            if tenant not in self._peer_keys or tenant == self.me or len(payload) > MAX_OFFER:
                raise ProtocolError("not from a known tenant, or too large")
            copies = msgpack.unpackb(bytes(payload), raw=False)
            mine = copies.get(self.me) if isinstance(copies, dict) else None
            if not isinstance(mine, bytes):
                raise ProtocolError("it holds no copy for this server")
            frame = self._offer_seal(tenant, self.me).open(topic, mine)
        except (ProtocolError, ValueError, TypeError, msgpack.UnpackException) as e:
            self.reject(f"dropped job offer on {topic!r}: {e}")
            return
        self.control.put_nowait((tenant, "ctl:offer", frame))

    def saw(self, peer: str) -> None:
        """An authenticated message from ``peer`` arrived: it is alive (for peers that publish presence)."""
        if peer in self._heard and peer not in self._goodbye:
            self._heard[peer] = time.monotonic()

    def gone(self, peer: str) -> str | None:
        """Why ``peer`` is gone (it said goodbye, or a service heard before has been silent for three of its
        publishing intervals), or None. A peer that never published presence is never called gone."""
        if peer in self._goodbye:
            return f"stopped ({self._goodbye[peer]})"
        last = self._heard.get(peer)
        if last is None:
            return None
        silent = time.monotonic() - last
        limit = 3 * self._heard_interval.get(peer, 2.0) + 2.0
        return f"has not been heard for {silent:.0f} s (killed, hung or cut off)" if silent > limit else None

    def _on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        sender = parts[3] if len(parts) == 4 else ""
        ep = self.endpoints.get(sender)
        try:
            if ep is None or parts[:3] != ["blindseg", self.deployment, self.me]:
                raise ProtocolError(f"message on unexpected topic {topic!r}")
            ep._receive(topic, bytes(payload))
        except ProtocolError as e:
            self.reject(f"dropped message from {sender or '?'}: {e}")

    def reject(self, reason: str) -> None:
        self.rejected.append(reason)
        del self.rejected[:-1000]
        log.warning("%s: %s", self.me, reason)

    def _drop_inflight(self) -> None:
        """The connection ended with frames unacknowledged: they may be lost, so every receive waiting on
        a peer fails now (its answer may never come) instead of after a round timeout."""
        if not self._inflight:
            return
        n = len(self._inflight)
        for pub in list(self._inflight):
            pub.cancel()
        err = ConnectionLost(f"the broker connection dropped with {n} frames in flight")
        for ep in self.endpoints.values():
            ep.inbox.fail_waiting(err)

    def _published(self, pub: asyncio.Future[Any]) -> None:
        self._inflight_bytes -= self._inflight.pop(pub, 0)
        if not pub.cancelled() and pub.exception() is not None:
            log.warning("%s: a publish failed (%s)", self.me, pub.exception())

    async def _connection(self) -> tuple[aiomqtt.Client, asyncio.Future[None]]:
        """The live client and the future its end resolves (waiting up to connect_timeout for one)."""
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout)
        except TimeoutError:
            raise ConnectionLost(f"not connected to the broker for {self.connect_timeout} s") from None
        client, lost = self._client, self._lost
        if client is None or lost is None or lost.done():
            raise ConnectionLost("broker connection dropped")
        return client, lost

    async def send_pipelined(self, topic: str, payloads: list[bytearray]) -> None:
        """Publish at QoS 1 in order without waiting for each acknowledgement: the broker's acks are
        awaited only while more than WINDOW bytes are unacknowledged (back-pressure for bulk), so a
        round's small frames never wait for the round trip to the broker. A connection that ends
        with frames in flight fails the waiting receives (:meth:`_drop_inflight`)."""
        client, lost = await self._connection()
        for m in payloads:
            pub = asyncio.ensure_future(client.publish(topic, m, qos=1, timeout=math.inf))  # tasks start in order
            self._inflight[pub] = len(m)
            self._inflight_bytes += len(m)
            pub.add_done_callback(self._published)
            while self._inflight_bytes > WINDOW and not lost.done():
                await asyncio.wait([*self._inflight, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                raise ConnectionLost("broker connection dropped while publishing")

    async def publish(self, topic: str, payload: bytes | bytearray) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement; ConnectionLost if the connection
        drops first (a publish in flight when the broker goes away would otherwise wait forever)."""
        client, lost = await self._connection()
        pub = asyncio.ensure_future(client.publish(topic, payload, qos=1, timeout=math.inf))
        try:
            await asyncio.wait((pub, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pub.done():
                pub.cancel()
        if pub.cancelled() or not pub.done():
            raise ConnectionLost("broker connection dropped while publishing")
        e = pub.exception()
        if isinstance(e, aiomqtt.MqttError):
            raise ConnectionLost(f"publish failed: {e}") from None
        if e is not None:
            raise e


_TEARDOWN_FRAMES = frozenset({"_add_writer", "_add_reader"})


def _socket_teardown_handler(previous: Any) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """A loop exception handler for one known race: when the broker drops the connection, paho can ask
    aiomqtt to watch a socket that is already closed, and the event loop's add_writer / add_reader raises
    inside a callback. The reconnect loop already handles the lost connection, so that one error is a
    warning line, not a traceback; every other error goes to the previous (or default) handler."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ValueError | OSError | KeyError) and exc.__traceback__ is not None and any(
                f.name in _TEARDOWN_FRAMES for f in traceback.extract_tb(exc.__traceback__)):
            log.warning("MQTT socket closed while the client registered it (%s: %s); reconnecting",
                        type(exc).__name__, exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handle.blindseg_teardown = True  # type: ignore[attr-defined]
    return previous if getattr(previous, "blindseg_teardown", False) else handle


class MqttEndpoint(Endpoint):
    """This party's link to one peer over the shared transport."""

    def __init__(self, transport: MqttTransport, peer: str, link: SecureLink) -> None:
        super().__init__()
        self.t, self.peer, self.secure = transport, peer, link
        self.inbox = _Inbox(max_bytes=max(2 * transport.max_frame, 1 << 20))
        self._out = topic_for(transport.deployment, peer, transport.me)
        self._in = topic_for(transport.deployment, transport.me, peer)
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._frame_id = 0  # frames sent this run
        self._last_in = 0  # the last complete frame id received in the current peer session
        self._partial: _Partial | None = None
        self._hello_at = -math.inf

    async def send_hello(self) -> None:
        self._hello_at = time.monotonic()
        try:
            await self.t.publish(self._out, self.secure.hello(self._out))
        except ConnectionLost as e:
            log.info("%s: hello to %s not sent (%s)", self.t.me, self.peer, e)

    async def wait_ready(self) -> None:
        """Until the peer's session is known: hello every second (a hello can be lost while the peer is
        not yet subscribed), up to ``handshake_timeout``."""
        deadline = time.monotonic() + self.t.handshake_timeout
        while not self._ready.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost(f"{self.peer} has not answered the handshake within "
                                     f"{self.t.handshake_timeout:.0f} s: is it running?")
            if time.monotonic() - self._hello_at >= 1.0:
                await self.send_hello()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), min(1.0, left))

    async def _send(self, label: str, frame: bytes) -> int:
        if len(frame) > self.t.max_frame:
            raise ProtocolError(f"frame {label!r} is {len(frame)} bytes, over the {self.t.max_frame}-byte limit")
        await self.wait_ready()
        async with self._lock:  # one frame's chunks stay contiguous on the topic
            self._frame_id += 1
            msgs = seal_chunks(self.secure, self._out, label, self._frame_id, frame, self.t.chunk)
            await self.t.send_pipelined(self._out, msgs)
        return sum(len(m) for m in msgs)

    async def recv(self, label: str, timeout: float | None = None) -> Frame:
        return await self.inbox.take(label, timeout)

    def wire_size(self, label: str, frame: Frame) -> int:
        n = max(1, -(-len(frame) // self.t.chunk))
        return len(frame) + n * (OVERHEAD + CHUNK_HEAD + len(label.encode()))

    def _receive(self, topic: str, message: bytes) -> None:
        if message[:4] == HELLO:
            self._on_hello(topic, message)
            return
        try:
            body = self.secure.open(topic, message)
        except UnknownSession:
            self._maybe_rehello()  # the peer talks to a run of ours that is gone (or we missed its hello)
            raise
        self.counters.bytes_received += len(message)
        self.t.saw(self.peer)  # any authenticated chunk proves the peer alive (a long bulk frame too)
        if len(body) < CHUNK_HEAD:
            raise ProtocolError("chunk is too short")
        (ll,) = struct.unpack(">H", body[:2])
        if len(body) < CHUNK_HEAD + ll:
            raise ProtocolError("chunk is too short")
        label = bytes(body[2:2 + ll]).decode("utf-8", "replace")
        fid, k, n, total = struct.unpack(">QIIQ", body[2 + ll:CHUNK_HEAD + ll])
        data = body[CHUNK_HEAD + ll:]  # a view: the only copy is the join below (none for one-chunk frames)
        frame = self._assemble(label, fid, k, n, total, data)
        if frame is None:
            return
        if label.startswith("ctl:"):
            self.t.control.put_nowait((self.peer, label, frame))
        else:
            self.inbox.deliver(label, frame)

    def _assemble(self, label: str, fid: int, k: int, n: int, total: int, data: memoryview) -> Frame | None:
        """Add one chunk; the whole frame once its last chunk is in (ProtocolError on any mismatch)."""
        t = self.t
        if n == 0 or k >= n or total > t.max_frame or n != max(1, -(-total // t.chunk)) or len(data) > t.chunk:
            self._partial = None
            raise ProtocolError(f"chunk {k}/{n} of {label!r} is out of order or over the size limit")
        p = self._partial
        if k == 0:
            if fid <= self._last_in:
                raise ProtocolError(f"frame {fid} of {label!r} is older than the last one received")
            if p is not None:
                t.reject(f"dropped incomplete frame {p.label!r} from {self.peer} ({len(p.parts)}/{p.n} chunks)")
            p = self._partial = _Partial(label, fid, n, total, time.monotonic())
        elif p is None or (p.label, p.fid, p.n, p.total) != (label, fid, n, total) or k != len(p.parts):
            self._partial = None
            raise ProtocolError(f"chunk {k}/{n} of {label!r} does not belong to the frame being assembled "
                                "(spliced, dropped or reordered chunks)")
        elif time.monotonic() - p.t0 > t.partial_age:
            self._partial = None
            raise ProtocolError(f"frame {label!r} took over {t.partial_age:.0f} s to arrive; dropped")
        p.parts.append(data)
        p.size += len(data)
        if k + 1 < n:
            if p.size != (k + 1) * t.chunk:
                self._partial = None
                raise ProtocolError(f"chunk {k}/{n} of {label!r} is shorter than a full chunk")
            return None
        self._partial = None
        if p.size != total:
            raise ProtocolError(f"frame {label!r} has {p.size} bytes, its chunks announced {total}")
        self._last_in = fid
        return p.parts[0] if n == 1 else b"".join(p.parts)

    def _on_hello(self, topic: str, message: bytes) -> None:
        had = self.secure.peer_e is not None
        new, reply = self.secure.accept(topic, message)
        if new:
            self._partial, self._last_in = None, 0
            if had:
                log.info("%s: %s restarted (new session); its earlier frames are void", self.t.me, self.peer)
                self.inbox.fail_all(PeerRestarted(f"{self.peer} restarted"))
            skew = self.secure.skew
            if abs(skew) > self.t.max_skew:
                log.warning("%s: clock of %s is %.0f s %s this host's (nothing depends on it, but logs and key "
                            "expiry dates will disagree)", self.t.me, self.peer, abs(skew),
                            "ahead of" if skew > 0 else "behind")
        elif reply and message[36:68] != bytes(32):  # the peer addressed another run of this identity
            log.info("%s: %s still addressed an earlier (or another) process with this identity; answered with ours "
                     "(run one process per identity)", self.t.me, self.peer)
        self._ready.set()
        if reply:
            self.t._spawn(self.send_hello())

    def _maybe_rehello(self) -> None:
        if time.monotonic() - self._hello_at > 1.0 and self.t._connected.is_set():
            self._hello_at = time.monotonic()
            self.t._spawn(self.send_hello())

    def close(self) -> None:
        self.inbox.closed = True
        for fut in self.inbox.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(f"link to {self.peer} closed"))


@dataclass
class _Partial:
    label: str
    fid: int
    n: int
    total: int
    t0: float
    parts: list[memoryview] = field(default_factory=list)
    size: int = 0
