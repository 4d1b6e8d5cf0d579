"""``blindseg init DIR``: a complete deployment kit.

Writes, under DIR::

    keys/<party>.key            X25519 private key (0600), one per identity (demo kits; see below)
    secrets/<party>.password    broker password (0600)
    configs/<party>.toml        one config per role (peers' public keys inside)
    broker/mosquitto.conf       TLS listener, password file, per-party ACLs, blindseg's queue settings
    broker/ca.crt, server.crt, server.key, passwd, acl

ACL: identity P may read only ``blindseg/<deployment>/P/#`` (what is addressed
to it) and write only ``blindseg/<deployment>/+/P`` (messages signed as itself).
Every data owner (tenant) is its own identity with its own key, password, topic
and ACL, so one hospital can neither subscribe to nor decrypt another's results.

Several server pairs (``pairs=N``): pair 1 is ``server0``/``server1``, pair k is
``server0-k``/``server1-k``, each with its own keys, configs, units and metrics port. Tenants
write job offers on ``blindseg/<deployment>/offers/<tenant>``; every pair's server0 reads them
through the shared subscription ``$share/<deployment>-pairs/...``.

Keys: ``blindseg keygen --party P`` on P's host and ``blindseg init DIR
--public-keys PUBS`` build a kit from public keys only; ``init`` without
``--public-keys`` makes every key in one place (demos and tests);
:func:`rotate_key` replaces one party's public key in the kit's configs.
With ``plain=True`` (the demo on loopback, or the embedded broker) no TLS and
no passwords are configured.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import ids
from .broker import mosquitto_config
from .config import ROLES, is_role, module_of, parse_server, server_name
from .crypto import generate_key, load_public, private_bytes, public_hex
from .errors import UsageError
from .transport import OFFERS, STATUS, offer_topic


def pair_names(pairs: int) -> list[str]:
    """The names of ``pairs`` server pairs: "" (server0/server1), then "2", "3", ..."""
    return [""] + [str(k) for k in range(2, pairs + 1)]


def links(identity: str, tenants: tuple[str, ...], pairs: int = 1) -> tuple[str, ...]:
    """Who ``identity`` talks to (both directions): a server to its pair's other server, the dealer, the
    model owner and every tenant; the dealer, the model owner and every tenant to every server."""
    servers = tuple(server_name(i, p) for p in pair_names(pairs) for i in (0, 1))
    me = parse_server(identity)
    if me is not None:
        return (server_name(1 - me[0], me[1]), "dealer", "model_owner") + tenants
    return servers + {"dealer": ("model_owner",), "model_owner": ("dealer",)}.get(identity, ())


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def mosquitto_password(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2 password-file hash ($7$: PBKDF2-SHA512)."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _certs(out: Path, host: str) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blindseg deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(out / "server.key", key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))


def keygen(party: str, out: str | Path) -> str:
    """Make one party's key pair where the party runs: ``<out>/<party>.key`` (0600, never leaves this
    host) and ``<out>/<party>.pub`` (hex, for whoever assembles the kit). Returns the public key."""
    ids.check("party", party)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    key_path = d / f"{party}.key"
    if key_path.exists():
        raise UsageError(f"{key_path} exists; move it away first (a key is never overwritten)")
    key = generate_key()
    _write_secret(key_path, private_bytes(key))
    (d / f"{party}.pub").write_text(public_hex(key) + "\n")
    return public_hex(key)


def _public_keys(directory: Path, identities: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in identities:
        f = directory / f"{p}.pub"
        try:
            hexkey = f.read_text().strip()
        except OSError:
            raise UsageError(f"no public key for {p}: expected {f} (run `blindseg keygen --party {p}` where "
                             f"{p} runs and copy its .pub here)") from None
        load_public(hexkey, str(f))
        if (directory / f"{p}.key").exists():
            raise UsageError(f"{directory} holds {p}.key, a private key: keep private keys where each party runs")
        out[p] = hexkey
    return out


def init(directory: str | Path, deployment: str = "blindseg", broker_host: str = "127.0.0.1", port: int = 8883,
         plain: bool = False, broker_url: str | None = None, net: str = "none", bind: str = "0.0.0.0",
         settings: dict[str, float] | None = None, tenants: tuple[str, ...] = ("data_owner",),
         public_keys: str | Path | None = None, install_dir: str = "/opt/blindseg",
         python: str = "/opt/blindseg/venv/bin/python", metrics: bool = True, pairs: int = 1) -> dict[str, Path]:
    """Write a deployment kit; returns each identity's config path.

    With ``public_keys`` (a directory of ``<identity>.pub`` files from ``blindseg keygen``) the kit holds
    no private key: each config names ``keys/<identity>.key``, which the party puts there itself.
    Without it the kit generates every key in one place -- for demos and tests only, since whoever holds
    the directory holds both servers' keys (it says so in ``keys/README``).

    ``broker/`` is self-contained (paths relative to it; ``broker/run.sh`` starts Mosquitto there), so
    it can be copied to the broker host as is. ``systemd/`` holds a unit per service for a kit copied to
    ``install_dir`` with blindseg installed for ``python``; each service's metrics and probes listen on
    loopback (``metrics``: dealer 9460, server0 9461, server1 9462, then two ports per further pair).
    ``pairs``: how many server pairs (jobs spread over them through the broker)."""
    root = Path(directory)
    if not 1 <= pairs <= 64:
        raise UsageError(f"a deployment has 1 to 64 server pairs, not {pairs}")
    if not deployment.replace("-", "").isalnum():
        raise UsageError(f"deployment name {deployment!r} must be letters, digits and dashes")
    for t in tenants:
        ids.check("tenant", t)
        if is_role(t) or t in (STATUS, OFFERS):
            raise UsageError(f"tenant name {t!r} is a role's name" if is_role(t) else
                             f"tenant name {t!r} is reserved (topic levels of presence documents and job offers)")
    if not tenants or len(set(tenants)) != len(tenants):
        raise UsageError("give one or more distinct tenant names")
    if (root / "configs").exists():
        raise UsageError(f"{root} already holds a deployment (configs/ exists); pick an empty directory")
    servers = tuple(server_name(i, p) for p in pair_names(pairs)[1:] for i in (0, 1))
    identities = ROLES + servers + tuple(tenants)
    ports = metrics_ports(pairs)
    group = f"pairs-{base64.b32encode(os.urandom(10)).decode().lower()}"  # only the server0s know it
    pubs = _public_keys(Path(public_keys), identities) if public_keys is not None else None
    for sub in ("keys", "secrets", "configs", "broker"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "state").mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root / "state", 0o700)
    if pubs is None:
        keys = {p: generate_key() for p in identities}
        pubs = {p: public_hex(k) for p, k in keys.items()}
        for p, k in keys.items():
            _write_secret(root / "keys" / f"{p}.key", private_bytes(k))
        (root / "keys" / "README").write_text(
            "DEMO KIT: every party's private key was generated here, so whoever holds this directory can act\n"
            "as both servers and defeat non-collusion. For a real deployment each party runs\n"
            "`blindseg keygen --party <name>` on its own host and the kit is built with\n"
            "`blindseg init DIR --public-keys <dir of .pub files>`.\n")
    else:
        (root / "keys" / "README").write_text(
            "Each party puts its own private key here as <name>.key (from `blindseg keygen`); this kit was\n"
            "built from public keys only.\n")
    passwords = {p: base64.urlsafe_b64encode(os.urandom(18)).decode() for p in identities}
    url = broker_url or (f"mqtt://{broker_host}:{port}" if plain else f"mqtts://{broker_host}:{port}")
    out: dict[str, Path] = {}
    for p in identities:
        who = parse_server(p)
        role = f"server{who[0]}" if who else p if p in ROLES else "data_owner"
        expires = (dt.date.today() + dt.timedelta(days=365)).isoformat()
        lines = [f'deployment = "{deployment}"', f'party = "{role}"', f'broker = "{url}"', f'key_file = "../keys/{p}.key"',
                 f"key_expires = {expires}", f'state_dir = "../state/{p}"', f'net = "{net}"']
        if who and who[1]:
            lines.insert(2, f'pair = "{who[1]}"')
        elif p != role and p != "data_owner":
            lines.insert(2, f'tenant = "{p}"')
        if who and who[0] == 0:
            lines.append(f'offer_group = "{group}"')
        if not plain:
            _write_secret(root / "secrets" / f"{p}.password", passwords[p].encode())
            lines += [f'username = "{p}"', f'password_file = "../secrets/{p}.password"', 'ca_file = "../broker/ca.crt"']
        if metrics and p in ports:
            lines.append(f'metrics_address = "127.0.0.1:{ports[p]}"')
        lines += [f"{k} = {v}" for k, v in (settings or {}).items()]
        lines += ["", "[peers]"] + [f'{q} = "{pubs[q]}"' for q in links(p, tuple(tenants), pairs)]
        path = root / "configs" / f"{p}.toml"
        path.write_text("\n".join(lines) + "\n")
        out[p] = path
    b = root / "broker"
    acl = []
    for p in identities:
        who = parse_server(p)
        acl += [f"user {p}", f"topic read blindseg/{deployment}/{p}/#", f"topic write blindseg/{deployment}/+/{p}",
                # presence documents (sealed per reader): each party writes its own, reads those for it
                f"topic write blindseg/{deployment}/{STATUS}/{p}/+", f"topic read blindseg/{deployment}/{STATUS}/+/{p}"]
        if who is not None and who[0] == 0:  # job offers: every pair's server0 reads them (shared subscription)
            acl.append(f"topic read {offer_topic(deployment)}")
        elif not is_role(p):  # a tenant offers its own jobs
            acl.append(f"topic write {offer_topic(deployment, p)}")
        acl.append("")
    (b / "acl").write_text("\n".join(acl))
    _write_secret(b / "passwd", "".join(f"{p}:{mosquitto_password(passwords[p])}\n" for p in identities).encode())
    if plain:
        (b / "mosquitto.conf").write_text(mosquitto_config(port, broker_host))
    else:
        _certs(b, broker_host)
        (b / "mosquitto.conf").write_text(mosquitto_config(  # relative: Mosquitto runs in broker/ (run.sh)
            port, bind, tls={"ca": "ca.crt", "cert": "server.crt", "key": "server.key"},
            password_file="passwd", acl_file="acl"))
    (b / "run.sh").write_text('#!/bin/sh\n# Start the broker with this folder\'s files (copy broker/ anywhere).\n'
                              'cd "$(dirname "$0")" && exec mosquitto -c mosquitto.conf "$@"\n')
    os.chmod(b / "run.sh", 0o755)
    _systemd_units(root / "systemd", deployment, install_dir, python, tuple(ports))
    return out


def metrics_ports(pairs: int = 1) -> dict[str, int]:
    """Loopback ports of the services' probes: dealer 9460, server0 9461, server1 9462, server0-2 9463, ..."""
    out = {"dealer": 9460}
    for k, p in enumerate(pair_names(pairs)):
        out.update({server_name(0, p): 9461 + 2 * k, server_name(1, p): 9462 + 2 * k})
    return out
_HARDENING = """NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
UMask=0077"""


def _systemd_units(d: Path, deployment: str, install_dir: str, python: str, services: tuple[str, ...]) -> None:
    """One unit per service (and the broker): restart on failure, graceful stop (SIGTERM: running jobs
    end with an error their data owner retries), writable only in the service's own state dir."""
    d.mkdir(exist_ok=True)
    for name in services:
        module = module_of(name)
        (d / f"blindseg-{name}.service").write_text(f"""[Unit]
Description=blindseg {name} (deployment {deployment})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=blindseg
Group=blindseg
WorkingDirectory={install_dir}
ExecStart={python} -m {module} --config {install_dir}/configs/{name}.toml
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=30
ReadWritePaths={install_dir}/state/{name}
Environment=NUMBA_CACHE_DIR={install_dir}/state/{name}/numba-cache
{_HARDENING}

[Install]
WantedBy=multi-user.target
""")
    (d / "blindseg-broker.service").write_text(f"""[Unit]
Description=blindseg MQTT broker (Mosquitto, deployment {deployment})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=mosquitto
WorkingDirectory={install_dir}/broker
ExecStart=/usr/sbin/mosquitto -c {install_dir}/broker/mosquitto.conf
Restart=on-failure
RestartSec=2
{_HARDENING}

[Install]
WantedBy=multi-user.target
""")


def rotate_key(directory: str | Path, party: str, public_key: str) -> list[Path]:
    """Replace ``party``'s public key in every config of the kit that lists it as a peer (after
    ``blindseg keygen`` made a new key where it runs). Returns the configs to hand out again; nothing
    else changes (other keys, passwords, broker)."""
    hexkey = public_key.strip()
    if Path(hexkey).is_file():
        hexkey = Path(hexkey).read_text().strip()
    load_public(hexkey, f"new public key of {party}")
    changed = []
    for cfg in sorted((Path(directory) / "configs").glob("*.toml")):
        text = cfg.read_text()
        new = re.sub(rf'^{re.escape(party)} = "[0-9a-f]*"$', f'{party} = "{hexkey}"', text, flags=re.M)
        if new != text:
            cfg.write_text(new)
            changed.append(cfg)
    if not changed:
        raise UsageError(f"no config in {directory}/configs lists {party!r} as a peer")
    return changed
