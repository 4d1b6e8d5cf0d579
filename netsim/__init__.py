"""netsim: LAN/WAN links on one machine, and a cost model that predicts them.

:class:`ShapedEndpoint` wraps any :class:`~blindseg.channel.Endpoint` (the
in-memory link or the MQTT transport): every frame it sends occupies the link
for ``bytes * 8 / bandwidth`` (FIFO: a frame waits for the one before it) and
arrives ``latency`` (+ uniform jitter) after it left. Each party wraps its own
outgoing links, so both directions are shaped. Protocols never see netsim.

:func:`predict_online` is the cost model: from an unshaped run's online time
and the per-round byte log of both servers, the time under a profile is
``T_none + sum over rounds of (latency + max_bytes_round * 8 / bandwidth)``
(a round is one exchange; both servers send at once, the bigger frame decides).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from blindseg.channel import Endpoint, Frame
from blindseg.errors import UsageError


@dataclass(frozen=True)
class Profile:
    """One-way latency (s), bandwidth (bit/s; 0 = unlimited), optional jitter (s, uniform), and the
    bytes a token-bucket link passes unpaced after an idle moment (``burst``; 0 for netsim's own FIFO
    pacing, a kernel tbf's depth for :mod:`netsim.netns` links)."""

    name: str
    latency: float = 0.0
    bandwidth: float = 0.0
    jitter: float = 0.0
    burst: int = 0

    @property
    def shaped(self) -> bool:
        return self.latency > 0 or self.bandwidth > 0 or self.jitter > 0

    def transfer_seconds(self, nbytes: int) -> float:
        return max(0, nbytes - self.burst) * 8 / self.bandwidth if self.bandwidth > 0 else 0.0


PROFILES = {
    "none": Profile("none"),
    "lan": Profile("lan", latency=0.1e-3, bandwidth=1e9),  # TrustMIS's LAN
    "wan": Profile("wan", latency=20e-3, bandwidth=100e6),
}


def profile(spec: str) -> Profile:
    """``none`` | ``lan`` | ``wan`` | ``"<latency ms>,<Mbit/s>[,<jitter ms>]"``."""
    if spec in PROFILES:
        return PROFILES[spec]
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or any(p < 0 for p in parts):
        raise UsageError(f"network profile {spec!r}: use none, lan, wan or '<latency ms>,<Mbit/s>[,<jitter ms>]'")
    return Profile(spec, parts[0] / 1e3, parts[1] * 1e6, parts[2] / 1e3 if len(parts) == 3 else 0.0)


class ShapedEndpoint(Endpoint):
    """An endpoint whose outgoing frames cross a shaped link (receives pass through)."""

    def __init__(self, inner: Endpoint, prof: Profile, seed: int | None = None) -> None:
        super().__init__()
        self.inner, self.profile = inner, prof
        self._free_at = 0.0
        self._last_arrival = 0.0
        self._queue: asyncio.Queue[tuple[float, str, bytes, asyncio.Future[None]]] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._rng = random.Random(seed)

    async def _send(self, label: str, frame: bytes) -> int:
        size = self.inner.wire_size(label, frame)  # counted when it enters the link
        if not self.profile.shaped:
            await self.inner.send(label, frame)
            return size
        now = time.perf_counter()
        start = max(now, self._free_at)
        self._free_at = start + self.profile.transfer_seconds(size)
        jitter = self._rng.uniform(0, self.profile.jitter) if self.profile.jitter else 0.0
        arrival = max(self._free_at + self.profile.latency + jitter, self._last_arrival)  # FIFO
        self._last_arrival = arrival
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._deliver())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((arrival, label, frame, done))
        busy = self._free_at - time.perf_counter()
        if busy > 2e-4:  # the sender's link is busy; shorter waits cost more in loop wake-ups than they model
            await asyncio.sleep(busy)
        if done.done() and done.exception() is not None:
            raise done.exception()  # type: ignore[misc]
        return size

    async def _deliver(self) -> None:
        while True:
            arrival, label, frame, done = await self._queue.get()
            await _sleep_until(arrival)
            try:
                await self.inner.send(label, frame)
                done.set_result(None)
            except Exception as e:  # surfaced to the sender if it is still waiting
                done.set_exception(e)

    async def recv(self, label: str, timeout: float | None = None) -> Frame:
        return await self.inner.recv(label, timeout)

    def wire_size(self, label: str, frame: Frame) -> int:
        return self.inner.wire_size(label, frame)

    async def aclose(self) -> None:
        """Stop the delivery task (frames still in flight are dropped, like a link going down)."""
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass
            self._pump = None


async def close(endpoints: list[Endpoint]) -> None:
    """Stop the delivery tasks of any shaped endpoints among ``endpoints``."""
    for ep in endpoints:
        if isinstance(ep, ShapedEndpoint):
            await ep.aclose()


async def _sleep_until(t: float) -> None:
    """Wake at ``t`` (perf_counter) without spinning (the simulator must not take CPU from the parties
    it simulates): epoll timeouts round up to whole milliseconds, so a wait is shortened by half a
    millisecond (the lateness then averages about zero) and a wait under 1 ms is not slept at all (a
    LAN's 0.1 ms is below the timer's resolution; :func:`predict_online` still counts it)."""
    left = t - time.perf_counter()
    if left > 1e-3:
        await asyncio.sleep(left - 0.5e-3)


def wrap(ep: Endpoint, prof: Profile) -> Endpoint:
    return ShapedEndpoint(ep, prof) if prof.shaped else ep


def round_bytes(logs: list[list[tuple[str, int]]]) -> dict[str, int]:
    """Per round label, the largest frame any server sent in it."""
    out: dict[str, int] = {}
    for log in logs:
        for label, n in log:
            out[label] = max(out.get(label, 0), n)
    return out


def predict_online(unshaped_seconds: float, logs: list[list[tuple[str, int]]], prof: Profile,
                   extra_frames: list[int] = ()) -> float:  # type: ignore[assignment]
    """Online time under ``prof`` from an unshaped run (see module docstring).

    ``extra_frames``: sizes of frames on the critical path outside the server
    rounds (input shares in, output shares out), each one more latency + transfer.
    """
    t = unshaped_seconds
    for n in list(round_bytes(logs).values()) + list(extra_frames):
        t += prof.latency + prof.transfer_seconds(n) + prof.jitter / 2
    return t


CHUNK = 1 << 20  # the MQTT transport's largest frame chunk (bytes), forwarded whole by the broker


@dataclass(frozen=True)
class Placement:
    """Where the broker sits: each party's access link to it (both directions; a party not named has
    none). A message from a to b crosses a's link, then b's: the broker forwards each chunk once it has
    all of it, so the slower link carries the whole message and the faster one only its last chunk."""

    name: str
    links: tuple[tuple[str, Profile], ...]

    def link(self, party: str) -> Profile:
        return dict(self.links).get(party, PROFILES["none"])

    def message_seconds(self, a: str, b: str, nbytes: int, chunk: int = CHUNK) -> float:
        return sum(self.message_parts(a, b, nbytes, chunk))

    def message_parts(self, a: str, b: str, nbytes: int, chunk: int = CHUNK) -> tuple[float, float]:
        """(latency, wire time) of one message from ``a`` to ``b`` through the broker."""
        pa, pb = self.link(a), self.link(b)
        last = min(chunk, nbytes)
        return (pa.latency + pb.latency + (pa.jitter + pb.jitter) / 2,
                max(pa.transfer_seconds(nbytes), pb.transfer_seconds(nbytes))
                + min(pa.transfer_seconds(last), pb.transfer_seconds(last)))

PLACEMENTS = ("server0", "third", "bridged")


def placement(where: str, prof: Profile) -> Placement:
    """``server0``: the broker beside server0 (server1 and the data owner reach it over ``prof``);
    ``third``: at a third site (every party over ``prof``); ``bridged``: two brokers, one beside each
    server, bridged over ``prof`` (the data owner reaches server0's over ``prof``). Every message to or from
    server1 then crosses the bridge as it would server1's access link (one more store-and-forward hop,
    which the unshaped run of the same layout carries), so its links are those of ``server0``."""
    if where == "server0":
        return Placement(f"broker at server0, {prof.name}", (("server1", prof), ("data_owner", prof)))
    if where == "third":
        return Placement(f"broker at a third site, {prof.name}",
                         (("server0", prof), ("server1", prof), ("data_owner", prof)))
    if where == "bridged":
        return Placement(f"two bridged brokers, {prof.name}", placement("server0", prof).links)
    raise UsageError(f"broker placement {where!r}: use one of {', '.join(PLACEMENTS)}")


def predict_placed(unshaped_seconds: float, logs: list[list[tuple[str, int]]], where: Placement,
                   io_frames: list[int] = (), overlap: dict[int, float] | None = None  # type: ignore[assignment]
                   ) -> float:
    """Online time with the broker at ``where``: the unshaped service run plus, per round, one
    server0 -> server1 message through the broker (:meth:`Placement.message_seconds`), and per input /
    output frame one data owner <-> server message.

    ``overlap`` (op index -> seconds): the time each op spent moving its bytes in the unshaped run
    (the service's per-op time less the in-process one). Within a frame of several chunks the link's
    pacing runs beside that software transfer (the broker forwards chunk by chunk), so an op is
    credited the share of it that falls on chunks after each frame's first; a frame of one chunk is
    sent, carried and read one after the other. Without it the wire time is added whole (right when
    frames are small or the link far slower than the software; an overestimate for large frames on a
    link about as fast as the software, e.g. 1 Gbit/s LAN at 128²)."""
    t = unshaped_seconds
    wire: dict[int, float] = {}
    sizes: dict[int, list[int]] = {}
    for label, n in round_bytes(logs).items():
        lat, tx = where.message_parts("server0", "server1", n)
        parts = label.rsplit(":", 2)
        op = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1  # <job>:<op>:<round>; else -1
        t += lat
        wire[op] = wire.get(op, 0.0) + tx
        sizes.setdefault(op, []).append(n)
    for op, tx in wire.items():
        total = sum(sizes[op])
        piped = sum(max(0, n - CHUNK) for n in sizes[op])
        credit = (overlap or {}).get(op, 0.0) * (piped / total if total else 0.0)
        t += max(0.0, tx - credit)
    for n in io_frames:
        t += where.message_seconds("data_owner", "server1", n)
    return t
