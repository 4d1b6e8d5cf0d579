"""``blindseg init DIR``: a complete deployment kit.

Writes, under DIR::

    keys/<party>.key            X25519 private key (0600), one per party
    secrets/<party>.password    broker password (0600)
    configs/<party>.toml        one config per role (peers' public keys inside)
    broker/mosquitto.conf       TLS listener, password file, per-party ACLs, blindseg's queue settings
    broker/ca.crt, server.crt, server.key, passwd, acl

ACL: party P may read only ``blindseg/<deployment>/P/#`` (what is addressed to
it) and write only ``blindseg/<deployment>/+/P`` (messages signed as itself).
With ``plain=True`` (the demo on loopback, or the embedded broker) no TLS and
no passwords are configured.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .broker import mosquitto_config
from .config import PARTIES
from .crypto import generate_key, private_bytes, public_hex
from .errors import UsageError

# who talks to whom (both directions)
LINKS = {
    "dealer": ("server0", "server1", "model_owner"),
    "server0": ("server1", "dealer", "model_owner", "data_owner"),
    "server1": ("server0", "dealer", "model_owner", "data_owner"),
    "model_owner": ("server0", "server1", "dealer"),
    "data_owner": ("server0", "server1"),
}


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


def init(directory: str | Path, deployment: str = "blindseg", broker_host: str = "127.0.0.1", port: int = 8883,
         plain: bool = False, broker_url: str | None = None, net: str = "none", bind: str = "0.0.0.0",
         settings: dict[str, float] | None = None) -> dict[str, Path]:
    """Write a deployment kit; returns each party's config path."""
    root = Path(directory)
    if not deployment.replace("-", "").isalnum():
        raise UsageError(f"deployment name {deployment!r} must be letters, digits and dashes")
    if (root / "configs").exists():
        raise UsageError(f"{root} already holds a deployment (configs/ exists); pick an empty directory")
    for sub in ("keys", "secrets", "configs", "broker", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    keys = {p: generate_key() for p in PARTIES}
    pubs = {p: public_hex(k) for p, k in keys.items()}
    passwords = {p: base64.urlsafe_b64encode(os.urandom(18)).decode() for p in PARTIES}
    url = broker_url or (f"mqtt://{broker_host}:{port}" if plain else f"mqtts://{broker_host}:{port}")
    out: dict[str, Path] = {}
    for p in PARTIES:
        _write_secret(root / "keys" / f"{p}.key", private_bytes(keys[p]))
        expires = (dt.date.today() + dt.timedelta(days=365)).isoformat()
        lines = [f'deployment = "{deployment}"', f'party = "{p}"', f'broker = "{url}"', f'key_file = "../keys/{p}.key"',
                 f"key_expires = {expires}", f'state_dir = "../state/{p}"', f'net = "{net}"']
        if not plain:
            _write_secret(root / "secrets" / f"{p}.password", passwords[p].encode())
            lines += [f'username = "{p}"', f'password_file = "../secrets/{p}.password"', 'ca_file = "../broker/ca.crt"']
        lines += [f"{k} = {v}" for k, v in (settings or {}).items()]
        lines += ["", "[peers]"] + [f'{q} = "{pubs[q]}"' for q in LINKS[p]]
        path = root / "configs" / f"{p}.toml"
        path.write_text("\n".join(lines) + "\n")
        out[p] = path
    b = root / "broker"
    acl = []
    for p in PARTIES:
        acl += [f"user {p}", f"topic read blindseg/{deployment}/{p}/#", f"topic write blindseg/{deployment}/+/{p}", ""]
    (b / "acl").write_text("\n".join(acl))
    _write_secret(b / "passwd", "".join(f"{p}:{mosquitto_password(passwords[p])}\n" for p in PARTIES).encode())
    if plain:
        (b / "mosquitto.conf").write_text(mosquitto_config(port, broker_host))
    else:
        _certs(b, broker_host)
        (b / "mosquitto.conf").write_text(mosquitto_config(
            port, bind, tls={"ca": str((b / "ca.crt").resolve()), "cert": str((b / "server.crt").resolve()),
                                  "key": str((b / "server.key").resolve())},
            password_file=str((b / "passwd").resolve()), acl_file=str((b / "acl").resolve())))
    return out
