"""A party's TOML config, validated with errors that name the file and the field.

::

    deployment = "demo"
    party = "server0"                 # dealer | server0 | server1 | model_owner | data_owner
    pair = "b"                        # servers of a further server pair: identity server0-b / server1-b
    broker = "mqtts://broker.example:8883"
    username = "server0"              # broker login (ACLs key on it)
    password_file = "secrets/server0.password"
    ca_file = "tls/ca.crt"            # for mqtts://
    key_file = "keys/server0.key"     # this party's X25519 private key (32 raw bytes)
    state_dir = "state/server0"
    tenant = "hospital-a"             # data owners only: this hospital's identity (default "data_owner")
    net = "none"                      # netsim profile on this party's links: none | lan | wan | "lat_ms,mbps"
    round_timeout = 120               # seconds a silent peer may take before the job fails (servers)
    bundle_wait = 120                 # seconds a job may wait for preprocessing (servers)
    job_timeout = 600                 # seconds the data owner waits for a job's output
    key_expires = 2027-11-21          # optional: the config is refused after this date (key rotation)
    max_job_bytes = 17179869184       # servers: a plan or job needing more preprocessing material is refused
    metrics_address = "127.0.0.1:9461"  # services: Prometheus /metrics, /healthz, /readyz ("" = off, the default)
    pool_expiry = 3600                # servers: drop ready bundles of a batch size unused this long (seconds)
    store_budget = 0                  # servers: most bytes of bundles on disk (0: as much as the disk allows)
    max_jobs = 2                      # server0 of a pair: offered jobs it takes while fewer run (several pairs)
    offer_group = "k3j..."            # server0s: the (secret) shared-subscription group of job offers

    [peers]                           # public keys (hex) of the parties this one talks to
    server1 = "ab12..."
    hospital-a = "cd34..."            # (servers) every tenant is a peer: its own key, topic and ACL

Relative paths are relative to the config file. An unknown field is refused (a misspelt
``round_timout`` would otherwise be silently ignored).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import ids
from .crypto import load_private, load_public
from .errors import UsageError
from .transport import OFFERS, STATUS, BrokerAddress

PARTIES = ("dealer", "server0", "server1", "model_owner", "data_owner")
ROLES = ("dealer", "server0", "server1", "model_owner")  # fixed names; any other peer is a tenant (data owner)
FIELDS = {"deployment", "party", "pair", "tenant", "broker", "username", "password_file", "ca_file", "key_file", "state_dir",
          "net", "round_timeout", "bundle_wait", "job_timeout", "key_expires", "max_job_bytes", "peers",
          "metrics_address", "pool_expiry", "store_budget", "max_jobs", "offer_group"}


_SERVER = re.compile(r"server([01])(?:-([A-Za-z0-9_]{1,16}))?")


def server_name(index: int, pair: str = "") -> str:
    """The identity of server ``index`` (0 or 1) of server pair ``pair`` ("" is the first pair:
    ``server0`` / ``server1``; pair ``b`` is ``server0-b`` / ``server1-b``)."""
    return f"server{index}" + (f"-{pair}" if pair else "")


def parse_server(name: str) -> tuple[int, str] | None:
    """(index, pair) of a server identity, or None if ``name`` is no server's."""
    m = _SERVER.fullmatch(name)
    return (int(m.group(1)), m.group(2) or "") if m else None


def pair_label(pair: str) -> str:
    """How reports name a server pair: "1" for the first ("" internally), else its name."""
    return pair or "1"


def module_of(identity: str) -> str:
    """The ``python -m`` module a service identity runs (``server0-2`` runs ``server0``)."""
    who = parse_server(identity)
    return f"server{who[0]}" if who else identity


def is_role(name: str) -> bool:
    """Whether ``name`` is a service's or the model owner's identity (anything else is a tenant)."""
    return name in ROLES or parse_server(name) is not None


def server_pairs(names: Iterable[str]) -> list[str]:
    """The server pairs among ``names`` (both of a pair's servers present), the first pair first."""
    found = {s for n in names if (s := parse_server(n)) is not None}
    return sorted((p for i, p in found if i == 0 and (1, p) in found), key=lambda p: (p != "", p))


@dataclass
class PartyConfig:
    path: Path
    deployment: str
    party: str
    broker: BrokerAddress
    key: X25519PrivateKey
    peers: dict[str, X25519PublicKey]
    state_dir: Path
    net: str
    round_timeout: float = 120.0  # a peer silent this long fails the job
    bundle_wait: float = 120.0  # how long a job waits for preprocessing before failing
    job_timeout: float = 600.0  # data owner: how long to wait for a job's output
    name: str = ""  # this party's identity on the wire: the role, or a data owner's tenant name
    max_job_bytes: int = 16 << 30
    metrics_address: str = ""  # host:port of the probes and metrics (services); "" = off
    pool_expiry: float = 3600.0  # servers: ready bundles of a batch size unused this long are dropped
    store_budget: int = 0  # servers: most bytes of bundles on disk (0: as much as the disk allows)
    max_jobs: int = 2  # server0 of a pair: jobs offered to the pairs are claimed while fewer run here
    offer_group: str = ""  # server0s: the shared-subscription group of job offers (default: <deployment>-pairs)

    def __post_init__(self) -> None:
        self.name = self.name or self.party

    def __repr__(self) -> str:  # never the key or the broker password
        return f"PartyConfig({self.path}, {self.deployment}, {self.name})"

    @property
    def tenants(self) -> list[str]:
        """The data-owner identities among the peers (a server's tenants)."""
        return [p for p in self.peers if not is_role(p)]

    @property
    def pairs(self) -> list[str]:
        """The server pairs this party has keys for (a data owner spreads its jobs over them)."""
        return server_pairs(self.peers)

    @staticmethod
    def load(path: str | Path, expect: str | tuple[str, ...] | None = None) -> PartyConfig:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read config file {p}: {e.__class__.__name__}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {p} is not valid TOML: {e}") from None

        def field(name: str, kind: type = str, default: object = None) -> object:
            v = raw.get(name, default)
            if v is None:
                raise UsageError(f"{p}: missing field {name!r}")
            if not isinstance(v, kind):
                raise UsageError(f"{p}: field {name!r} must be a {kind.__name__}")
            return v

        def rel(v: str) -> Path:
            q = Path(v)
            return q if q.is_absolute() else (p.parent / q)

        unknown = sorted(set(raw) - FIELDS)
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, FIELDS, 1, 0.7))
                     else repr(k) for k in unknown]
            raise UsageError(f"{p}: unknown field(s) {', '.join(hints)} (known: {', '.join(sorted(FIELDS))})")
        party = str(field("party"))
        if party not in PARTIES:
            raise UsageError(f"{p}: party must be one of {', '.join(PARTIES)}, got {party!r}")
        if expect is not None and party not in ((expect,) if isinstance(expect, str) else expect):
            raise UsageError(f"{p}: this is the config of {party!r}, not of {expect!r}")
        password = None
        if "password_file" in raw:
            try:
                password = rel(str(field("password_file"))).read_text().strip()
            except OSError:
                raise UsageError(f"{p}: cannot read password_file {raw['password_file']!r}") from None
        ca = str(rel(str(raw["ca_file"]))) if "ca_file" in raw else None
        broker = BrokerAddress.parse(str(field("broker")), str(raw["username"]) if "username" in raw else None,
                                     password, ca)
        if "key_expires" in raw:
            import datetime as dt

            exp = raw["key_expires"]
            if not isinstance(exp, dt.date):
                raise UsageError(f"{p}: key_expires must be a TOML date (YYYY-MM-DD)")
            if exp < dt.date.today():
                raise UsageError(f"{p}: this party's key expired on {exp}; run `blindseg init` for new keys")
        key_path = rel(str(field("key_file")))
        try:
            key = load_private(key_path.read_bytes(), str(key_path))
        except FileNotFoundError:
            raise UsageError(f"{p}: key file {key_path} does not exist") from None
        peers_raw = field("peers", dict)
        peers = {}
        for name, hexkey in peers_raw.items():  # type: ignore[attr-defined]
            try:
                ids.check("peer", name)
            except UsageError as e:
                raise UsageError(f"{p} [peers]: {e}") from None
            peers[name] = load_public(str(hexkey), f"{p} [peers] {name}")
        tenant = str(field("tenant", str, "data_owner"))
        if "tenant" in raw and party != "data_owner":
            raise UsageError(f"{p}: only a data owner has a tenant name")
        if is_role(tenant) or tenant in (STATUS, OFFERS):
            raise UsageError(f"{p}: tenant name {tenant!r} is " + ("a role's name" if is_role(tenant) else "reserved"))
        pair = str(field("pair", str, ""))
        if pair and (party not in ("server0", "server1") or parse_server(server_name(0, pair)) is None):
            raise UsageError(f"{p}: " + ("only a server belongs to a server pair" if party not in ("server0", "server1")
                                         else f"pair name {pair!r} must be 1-16 letters, digits or '_'"))
        try:
            ids.check("tenant", tenant)
        except UsageError as e:
            raise UsageError(f"{p}: {e}") from None
        mjb = raw.get("max_job_bytes", 16 << 30)
        if not isinstance(mjb, int) or isinstance(mjb, bool) or mjb <= 0:
            raise UsageError(f"{p}: field 'max_job_bytes' must be a positive integer")
        budget = raw.get("store_budget", 0)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise UsageError(f"{p}: field 'store_budget' must be a number of bytes (0: no budget)")
        max_jobs = raw.get("max_jobs", 2)
        if not isinstance(max_jobs, int) or isinstance(max_jobs, bool) or not 1 <= max_jobs <= 1000:
            raise UsageError(f"{p}: field 'max_jobs' must be a whole number of jobs in [1, 1000]")

        group = str(field("offer_group", str, f"{raw.get('deployment', '')}-pairs"))
        if "offer_group" in raw and party != "server0":
            raise UsageError(f"{p}: only a server0 takes job offers (offer_group)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", group):
            raise UsageError(f"{p}: field 'offer_group' must be 1-64 letters, digits, '-' or '_'")

        def seconds(name: str, default: float) -> float:
            v = raw.get(name, default)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= 86400:
                raise UsageError(f"{p}: field {name!r} must be a number of seconds in (0, 86400]")
            return float(v)

        metrics = str(field("metrics_address", str, ""))
        if metrics:
            host, _, port = metrics.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise UsageError(f"{p}: field 'metrics_address' must be host:port (e.g. 127.0.0.1:9461), got "
                                 f"{metrics!r}")
        name = (tenant if party == "data_owner" else server_name(int(party[-1]), pair)
                if party in ("server0", "server1") else party)
        return PartyConfig(p, str(field("deployment")), party, broker, key, peers,
                           rel(str(field("state_dir", str, f"state/{name}"))), str(field("net", str, "none")),
                           seconds("round_timeout", 120.0), seconds("bundle_wait", 120.0), seconds("job_timeout", 600.0),
                           name, mjb, metrics,
                           seconds("pool_expiry", 3600.0), budget, max_jobs, group)
