"""What a running service says about itself: Prometheus metrics, liveness/readiness probes, and the
presence document that ``blindseg status`` reads.

- **Metrics** (``prometheus_client``, one registry per service, no globals): jobs by outcome, job
  seconds by phase (wait = arrival to first round, online), rounds and bytes, pool depth per model and
  batch size, bundles made and their seconds (dealer), errors by reason.
- **Probes** on ``metrics_address`` (loopback by default, off when empty): ``GET /metrics`` (the
  Prometheus text format), ``GET /healthz`` (200 while the event loop runs), ``GET /readyz`` (200 when
  connected to the broker and serving; else 503 with the reason).
- **Presence**: every few seconds the service publishes :meth:`Health.document` for each of its peers,
  sealed for that reader (:class:`~blindseg.crypto.PresenceSeal`: the broker sees only ciphertext),
  retained on ``blindseg/<deployment>/status/<service>/<reader>``; a clean stop publishes a goodbye
  (``up: false`` with the reason). A service killed without one simply stops publishing, which the
  reader reports. The document is operational only (counts, epochs, reasons); a data owner's copy
  lists only its own failures. It decides nothing but what a person does.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from . import __version__

log = logging.getLogger("blindseg.health")

REASONS = ("usage", "protocol", "epoch", "timeout", "connection", "internal")


def reason_of(e: BaseException) -> str:
    """A bounded label for an error (metrics must not take free text)."""
    from .errors import ConnectionLost, ProtocolError, StaleEpoch, UsageError

    if isinstance(e, StaleEpoch):
        return "epoch"
    if isinstance(e, ConnectionLost):
        return "connection"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ProtocolError):
        return "protocol"
    if isinstance(e, UsageError):
        return "usage"
    return "internal"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def utc_age(stamp: str) -> float | None:
    """Seconds since an ISO time written by :func:`utc_now` (None if it is not one)."""
    try:
        return (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(stamp)).total_seconds()
    except (ValueError, TypeError):
        return None


class Health:
    """A service's metrics, readiness and presence document."""

    def __init__(self, party: str, deployment: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.party, self.deployment = party, deployment
        self.started = time.time()
        self.registry = r = CollectorRegistry()
        self.jobs = Counter("blindseg_jobs", "jobs finished, by outcome (ok or an error reason)", ["outcome"],
                            registry=r)
        self.job_seconds = Histogram("blindseg_job_seconds", "job time by phase (wait: arrival to first round; "
                                     "online: the rounds)", ["phase"], registry=r,
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.rounds = Counter("blindseg_rounds", "online rounds run", registry=r)
        self.bytes = Counter("blindseg_online_bytes", "online bytes sent to the peer server", registry=r)
        self.offline_bytes = Counter("blindseg_offline_bytes", "preprocessing bytes received from the dealer",
                                     registry=r)
        self.pool = Gauge("blindseg_pool_bundles", "ready bundles per model and batch size", ["model", "batch"],
                          registry=r)
        self.bundles = Counter("blindseg_bundles_generated", "bundles made and sent (dealer)", registry=r)
        self.bundle_seconds = Histogram("blindseg_bundle_seconds", "dealer compute seconds per bundle", registry=r,
                                        buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.errors = Counter("blindseg_errors", "failed requests and jobs, by reason", ["reason"], registry=r)
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self.checks: list[Callable[[], str | None]] = []  # each: None when fine, else why not ready
        self.info: Callable[[str], dict[str, Any]] = lambda reader: {}  # the role's part, for that reader
        self.refresh: Callable[[], None] = lambda: None  # update gauges before a scrape
        self.interval = 2.0  # seconds between presence documents

    def failed(self, what: str, e: BaseException, job: str | None = None, who: str = "") -> None:
        """Count a failure of ``who``'s request and remember its reason (the last 20)."""
        reason = reason_of(e)
        self.errors.labels(reason).inc()
        if job is not None:
            self.jobs.labels(reason).inc()
        text = str(e) if not isinstance(e, TimeoutError) else f"{what} timed out"
        self.failures.append({"time": utc_now(), "what": what, "job": job[:8] if job else None, "reason": reason,
                              "error": text[:300], "from": who})

    def not_ready(self) -> str | None:
        for check in self.checks:
            why = check()
            if why:
                return why
        return None

    def document(self, reader: str = "") -> dict[str, Any]:
        """The presence document for ``reader``: who, since when, the role's state, and the recent
        failures (a data owner sees only its own)."""
        from .config import is_role

        failures = [f for f in self.failures if is_role(reader) or reader == "" or f["from"] == reader]
        try:
            info = self.info(reader)
        except Exception as e:  # the document must never take the service down
            info = {"info_error": e.__class__.__name__}
        return {"party": self.party, "deployment": self.deployment, "up": True, "version": __version__,
                "time": utc_now(), "started": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(
                    timespec="seconds"), "uptime_seconds": round(time.time() - self.started, 1),
                "interval": self.interval, "ready": self.not_ready() or "yes",
                "recent_failures": failures[-10:], **info}

    def goodbye(self, reason: str) -> dict[str, Any]:
        return {"party": self.party, "deployment": self.deployment, "up": False, "time": utc_now(),
                "reason": reason, "version": __version__}

    # ------------------------------------------------------------- probes
    async def serve_probes(self, address: str) -> asyncio.Server | None:
        """``host:port`` -> an HTTP server for /metrics, /healthz, /readyz (None when ``address`` is empty)."""
        if not address:
            return None
        from .errors import UsageError

        host, _, port = address.rpartition(":")
        try:
            server = await asyncio.start_server(self._http, host or "127.0.0.1", int(port))
        except OSError as e:
            raise UsageError(f"{self.party}: cannot listen for metrics and probes on {address} ({e.strerror}); "
                             "change metrics_address in its config") from None
        log.info("%s: metrics and probes on http://%s/metrics, /healthz, /readyz", self.party,
                 ":".join(str(x) for x in server.sockets[0].getsockname()[:2]))
        return server

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():  # headers: not needed
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, ctype, body = self.respond(parts[0] if parts else "", path)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()

    def respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        """(status line, content type, body) of one probe request."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            try:
                self.refresh()
            except Exception:  # a scrape must not fail on a gauge
                log.exception("%s: refreshing metrics failed", self.party)
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            why = self.not_ready()
            return ("503 Service Unavailable", "text/plain", f"not ready: {why}\n".encode()) if why else \
                ("200 OK", "text/plain", b"ready\n")
        return "404 Not Found", "text/plain", b"/metrics, /healthz or /readyz\n"
