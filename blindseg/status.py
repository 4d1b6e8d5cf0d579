"""``blindseg status --config <any party's config>``: every service's health, pool and recent failures,
from the presence documents the services publish themselves (:mod:`blindseg.health`).

It logs in to the broker with the config's credentials under a fresh client id (it never takes over the
party's secure sessions), reads the retained documents sealed for this party on
``blindseg/<deployment>/status/+/<party>`` (only this party can open them; only the service can have
written them), and listens a little longer than the services' publishing interval: a service whose
document arrives again, dated within a minute of this clock, is **up**; one whose last word is its
goodbye is **down** (with the reason); one whose retained document says up but that sends nothing
new is **not heard** (killed, hung, or cut off: the document's time says since when); one never seen
is **unknown**. A data owner sees the servers (it holds no dealer key); the model owner's or a
server's config shows every service.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from typing import Any

from .config import PartyConfig, parse_server
from .crypto import PresenceSeal
from .errors import ConnectionLost, ProtocolError, UsageError
from .health import utc_age
from .transport import _fatal_reason, status_topic


def is_service(name: str) -> bool:
    """The dealer and every server of every pair publish presence (the model owner and tenants don't)."""
    return name == "dealer" or parse_server(name) is not None


async def collect(cfg: PartyConfig, listen: float = 3.0) -> dict[str, Any]:
    """{party: its latest document + ``state`` and ``fresh``} for every service of the deployment."""
    import aiomqtt

    b = cfg.broker
    docs: dict[str, dict[str, Any]] = {}
    fresh: set[str] = set()
    seals = {p: PresenceSeal(cfg.key, pk, cfg.deployment, p, cfg.name) for p, pk in cfg.peers.items()}
    try:
        async with aiomqtt.Client(b.host, b.port, username=b.username, password=b.password,
                                  tls_context=b.tls_context(), identifier=f"{cfg.deployment}-status-{uuid.uuid4().hex[:8]}",
                                  timeout=10) as client:
            await client.subscribe(status_topic(cfg.deployment, "+", cfg.name), qos=1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + listen
            want = {p for p in cfg.peers if is_service(p)}
            it = client.messages
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await asyncio.wait_for(it.__anext__(), left)
                except TimeoutError:
                    break
                party = str(msg.topic).split("/")[-2]
                if party not in seals:
                    continue
                try:
                    doc = json.loads(seals[party].open(str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]
                except (ProtocolError, ValueError, TypeError):
                    continue  # not from that service: ignored
                if isinstance(doc, dict) and doc.get("party") == party:
                    docs[party] = doc
                    if not msg.retain:
                        fresh.add(party)
                    if msg.retain and doc.get("up") and isinstance(doc.get("interval"), int | float):
                        # listen at least one publishing interval past the retained copy, for a fresh one
                        deadline = max(deadline, loop.time() + min(float(doc["interval"]) * 1.5, 30.0))
                if all(p in fresh or not docs[p].get("up") for p in docs) and set(docs) >= want:
                    break  # every expected service answered (or said goodbye): no need to wait longer
    except aiomqtt.MqttError as e:
        why = _fatal_reason(e, b)
        if why is not None:
            raise UsageError(why) from None
        raise ConnectionLost(f"cannot reach the MQTT broker at {b.host}:{b.port}: {e}") from None
    out: dict[str, Any] = {}
    for party in sorted({p for p in cfg.peers if is_service(p)} | set(docs)):
        doc = dict(docs.get(party, {}))
        age = utc_age(str(doc.get("time", "")))
        if not doc:
            doc["state"] = "unknown"
            doc["reason"] = "no presence document (never started on this broker, or the broker lost it)"
        elif not doc.get("up"):
            doc["state"] = "down"
        elif party in fresh and age is not None and abs(age) < 60:
            doc["state"] = "up"
        else:
            doc["state"] = "not heard"
            doc["reason"] = (f"nothing new within {listen:.0f} s; its last document is from {doc.get('time', '?')}"
                             + (f" ({age:.0f} s ago by this clock)" if age is not None else "")
                             + ": killed, hung or cut off")
        out[party] = doc
    return out


def render(deployment: str, services: dict[str, Any]) -> str:
    """A table a person reads at a glance."""
    lines = [f"deployment {deployment}"]
    for party, d in services.items():
        state = d["state"]
        head = f"  {party:<8} {state:<7}"
        if state in ("unknown", "not heard"):
            lines.append(f"{head} {d['reason']}")
            continue
        if state == "down":
            lines.append(f"{head} since {d.get('time', '?')}: {d.get('reason', '?')}")
            continue
        bits = [f"v{d.get('version', '?')}", f"up {_duration(float(d.get('uptime_seconds', 0)))}",
                f"ready: {d.get('ready', '?')}", f"last document {d.get('time', '?')}"]
        lines.append(f"{head} {', '.join(bits)}")
        models = d.get("models") or {}
        if models:
            lines.append("           models: " + ", ".join(f"{m}@{e}" for m, e in sorted(models.items())))
        if "pool" in d:
            pool = d["pool"] or {}
            text = "; ".join(f"{k}: " + ", ".join(f"batch {b} x{n}" for b, n in v.items()) for k, v in pool.items())
            claimed = f" (+{d['jobs_claimed']} claimed)" if d.get("jobs_claimed") else ""
            lines.append(f"           pool: {text or 'empty'}; jobs running: {d.get('jobs_running', 0)}{claimed}; "
                         f"store {_size(int(d.get('store_bytes', 0)))}")
        if "bundles_made" in d:
            q = d.get("queued") or {}
            made = int(d["bundles_made"])
            each = f" ({float(d.get('bundle_seconds_total', 0)) / made:.2f} s each)" if made else ""
            lines.append(f"           bundles made: {made}{each}; queued: "
                         + ("; ".join(f"{k}: " + ", ".join(f"batch {b} x{n}" for b, n in v.items())
                                      for k, v in q.items()) or "none"))
        for f in d.get("recent_failures") or []:
            job = f" job {f['job']}" if f.get("job") else ""
            lines.append(f"           failed {f.get('time', '?')} {f.get('what', '?')}{job} ({f.get('reason')}): "
                         f"{f.get('error', '')[:160]}")
    return "\n".join(lines)


def _duration(s: float) -> str:
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    k = min(3, int(math.log(n, 1024)))
    return f"{n / 1024 ** k:.1f} {('KB', 'MB', 'GB')[k - 1]}"
