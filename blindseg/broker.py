"""Brokers: the project's Mosquitto config and launcher, and the embedded amqtt broker.

Mosquitto's stock config breaks MPC jobs silently (DESIGN.md section 7): it drops
messages once a subscriber is ``max_queued_messages`` (1000) behind, and
without TCP_NODELAY a QoS 1 round trip takes ~88 ms. :func:`mosquitto_config`
writes the config blindseg needs: no queue limits, TCP_NODELAY, and a packet
size bound that our 1 MiB chunking always respects (a bigger packet
disconnects its sender, loudly, instead of being dropped silently).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConnectionLost, UsageError

MAX_PACKET = 4 << 20  # our chunks are 1 MiB + a small sealed header


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_config(port: int, bind: str = "127.0.0.1", *, tls: dict[str, str] | None = None,
                     password_file: str | None = None, acl_file: str | None = None) -> str:
    """A Mosquitto 2 config for blindseg (plain listener, or TLS + passwords + ACLs)."""
    lines = [
        "# blindseg broker config (DESIGN.md section 7): never drop, never delay.",
        "per_listener_settings false",
        "persistence false",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        "set_tcp_nodelay true",
        f"max_packet_size {MAX_PACKET}",
        "log_type error",
        "log_type warning",
        f"listener {port} {bind}",
    ]
    if tls:
        lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}", "tls_version tlsv1.2"]
    if password_file:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines += ["allow_anonymous true"]
    if acl_file:
        lines.append(f"acl_file {acl_file}")
    return "\n".join(lines) + "\n"


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds for a clean exit, then SIGKILL (a child this process started)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConnectionLost(f"broker did not open {host}:{port} within {timeout} s") from None
            time.sleep(0.05)


class Mosquitto:
    """A private ``mosquitto -c <config>`` on a free loopback port (tests, benchmarks)."""

    def __init__(self, workdir: str | Path, port: int | None = None, config: str | None = None,
                 cwd: str | Path | None = None, wrap: Sequence[str] = (), host: str = "127.0.0.1") -> None:
        """``cwd``: where relative paths in ``config`` point (a kit's ``broker/``). ``wrap``: a command prefix
        (e.g. ``ip netns exec NS``); ``host``: the address its listener is reached at from here."""
        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
        if self.binary is None:
            raise UsageError("the mosquitto binary is not installed")
        self.workdir, self.cwd, self.wrap, self.host = Path(workdir), cwd, list(wrap), host
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        text = config or mosquitto_config(self.port)
        if os.geteuid() == 0:  # mosquitto started as root drops to user "mosquitto", which cannot read our 0600 files
            text += "user root\n"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Mosquitto:
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([*self.wrap, self.binary or "mosquitto", "-c", str(self.conf.resolve())],
                                     stdout=log, stderr=log, cwd=self.cwd)
        wait_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietBroadcast(dict):  # type: ignore[type-arg]
    """A broadcast record whose str() does not format the payload.

    amqtt 0.12 builds ``f"Processing broadcast message: {broadcast}"`` for every message even with
    DEBUG off (DESIGN.md section 7); with a 1 MiB payload that repr is most of the broker's work."""

    def __repr__(self) -> str:
        return f"<broadcast on {self.get('topic')!r}, {len(self.get('data') or b'')} bytes>"

    __str__ = __repr__


class _QuietQueue(asyncio.Queue):  # type: ignore[type-arg]
    async def put(self, item: Any) -> None:
        await super().put(_QuietBroadcast(item) if isinstance(item, dict) else item)


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """amqtt 0.12 iterates its subscription map with awaits inside the loop (retained messages on
    connect, broadcasts) while other clients subscribe: "dictionary changed size during iteration"
    kills a connecting client's session. Iterating a snapshot is what it means."""

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return list(super().items())


class EmbeddedBroker:
    """amqtt in this process (the zero-install default). Anonymous, loopback by default."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt311://{self.host}:{self.port}"  # amqtt 0.12 speaks MQTT 3.1.1 only

    async def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        if isinstance(getattr(self._broker, "_broadcast_queue", None), asyncio.Queue):
            self._broker._broadcast_queue = _QuietQueue()  # see _QuietBroadcast
        if type(getattr(self._broker, "_subscriptions", None)) is dict:
            self._broker._subscriptions = _SnapshotDict(self._broker._subscriptions)  # see _SnapshotDict
        await self._broker.start()
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.shutdown(), 10)
            self._broker = None
