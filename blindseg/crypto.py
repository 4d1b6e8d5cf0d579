"""End-to-end encryption between two parties: a per-run authenticated handshake, then AES-256-GCM.

Every party has a static X25519 key (its identity; the kit carries only the public halves to the
others) and, per process run, one fresh *ephemeral* X25519 key that is never written anywhere.
Two parties X and Y agree on keys with a Noise-KK-like exchange of hellos over the broker::

    hello  = b"BSH2" | e_X (32) | seen (32: the ephemeral of Y that X holds, or zeros) | time (8) | mac (32)
    mac    = HMAC-SHA256(HKDF(DH(s_X, s_Y)), hello without mac | topic)

    key X->Y = HKDF-SHA256(DH(e_X, e_Y) | DH(s_X, e_Y) | DH(e_X, s_Y),
                           salt = e_X | e_Y, info = "blindseg/2 <deployment> X->Y")

Properties: the key needs an ephemeral private key and a static one of each side, so only X and Y
can compute it (mutual authentication, resistant to key-compromise impersonation); a later leak of
both static keys does not open recorded traffic (``ee`` needs an ephemeral, which dies with the
process: forward secrecy); every run of either party gives new keys, so a message recorded in another
run (after a restart, or in any earlier CLI session) cannot authenticate. A party answers a hello
whose ``seen`` is not its own current ephemeral, so two parties converge after any restart; an
ephemeral a party has moved away from is *retired*: its session is dropped (frames of that run still
in flight are void) and its hellos are refused, so a broker cannot roll a link back to an earlier run.
No replay state has to outlive a process.

Sealed message::

    b"BSE2" | session id (16) | counter (8, big endian) | AES-GCM(ciphertext + 16-byte tag)

session id = SHA-256(e_X | e_Y)[:16]; nonce = 4 zero bytes | counter; AAD = the 28-byte prefix +
topic. The receiver rejects (:class:`~blindseg.errors.ProtocolError`) anything that does not
authenticate, an unknown session, and a counter that does not increase within its session. The
hello's clock is not used for any check; :attr:`SecureLink.skew` lets the transport say "clock of
server1 is 412 s ahead" once, at connect.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError, UnknownSession, UsageError

MAGIC = b"BSE2"
HELLO = b"BSH2"
PRESENCE = b"BSP2"  # a service's presence document for one reader (static-static key: see PresenceSeal)
PREFIX = 4 + 16 + 8
TAG = 16
OVERHEAD = PREFIX + TAG
HELLO_SIZE = 4 + 32 + 32 + 8 + 32
_ZERO = bytes(32)


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_hex(key: X25519PrivateKey) -> str:
    return _raw(key.public_key()).hex()


def load_private(raw: bytes, where: str) -> X25519PrivateKey:
    if len(raw) != 32:
        raise UsageError(f"{where}: an X25519 private key is 32 bytes, this file has {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(hexstr: str, where: str) -> X25519PublicKey:
    try:
        raw = bytes.fromhex(hexstr)
    except ValueError:
        raise UsageError(f"{where}: public key is not hex") from None
    if len(raw) != 32:
        raise UsageError(f"{where}: an X25519 public key is 32 bytes (64 hex digits)")
    return X25519PublicKey.from_public_bytes(raw)


def session_key(ee: bytes, es: bytes, se: bytes, e_from: bytes, e_to: bytes, deployment: str, sender: str,
                receiver: str) -> bytes:
    """The direction key ``sender -> receiver`` from the three DH values (see the module docstring)."""
    info = f"blindseg/2 {deployment} {sender}->{receiver}".encode()
    return HKDF(hashes.SHA256(), 32, salt=e_from + e_to, info=info).derive(ee + es + se)


def session_id(e_from: bytes, e_to: bytes) -> bytes:
    return hashlib.sha256(b"blindseg/2 sid" + e_from + e_to).digest()[:16]


@dataclass
class _Session:
    aead: AESGCM = field(repr=False)
    last: int = 0  # receive side: the highest counter accepted; send side: the last counter used


class SecureLink:
    """One party's end of the encrypted link to one peer (pure: no I/O; the transport moves hellos).

    ``ephemeral`` is this process run's key, shared by all of its links."""

    def __init__(self, key: X25519PrivateKey, peer: X25519PublicKey, ephemeral: X25519PrivateKey,
                 deployment: str, me: str, peer_name: str) -> None:
        self._s, self._peer_s, self._e = key, peer, ephemeral
        self.e_pub = _raw(ephemeral.public_key())
        self.deployment, self.me, self.peer = deployment, me, peer_name
        ss = key.exchange(peer)
        pair = " ".join(sorted((me, peer_name)))
        self._mac_key = HKDF(hashes.SHA256(), 32, salt=None,
                             info=f"blindseg/2 hello {deployment} {pair}".encode()).derive(ss)
        self.peer_e: bytes | None = None  # the peer run's ephemeral this side talks to
        self.retired: set[bytes] = set()
        self.skew = 0.0  # the peer's clock minus ours, as its last hello said (includes transit time)
        self._send: tuple[bytes, _Session] | None = None
        self._recv: dict[bytes, _Session] = {}  # the current peer run's session

    def __repr__(self) -> str:
        return f"SecureLink({self.me}->{self.peer}, ready={self.ready})"

    @property
    def ready(self) -> bool:
        return self._send is not None

    # ------------------------------------------------------------ handshake
    def hello(self, topic: str) -> bytes:
        """This side's hello for ``topic`` (the peer's inbox topic)."""
        body = HELLO + self.e_pub + (self.peer_e or _ZERO) + struct.pack(">d", time.time())
        return body + hmac.new(self._mac_key, body + topic.encode(), hashlib.sha256).digest()

    def accept(self, topic: str, msg: bytes) -> tuple[bool, bool]:
        """Take the peer's hello: ``(new, reply)`` -- whether it starts a new peer session (the peer
        (re)started) and whether the peer does not yet hold our ephemeral (answer with :meth:`hello`)."""
        if len(msg) != HELLO_SIZE or msg[:4] != HELLO:
            raise ProtocolError("handshake message is malformed")
        body, mac = msg[:-32], msg[-32:]
        if not hmac.compare_digest(mac, hmac.new(self._mac_key, body + topic.encode(), hashlib.sha256).digest()):
            raise ProtocolError("handshake failed authentication (wrong key, wrong topic or tampered)")
        e, seen = bytes(body[4:36]), bytes(body[36:68])
        (their_time,) = struct.unpack(">d", body[68:76])
        if e in self.retired:
            raise ProtocolError(f"stale handshake from an earlier run of {self.peer} (replayed)")
        new = e != self.peer_e
        if new:
            if self.peer_e is not None:
                self.retired.add(self.peer_e)
            self._start(e)
        self.skew = their_time - time.time()
        return new, seen != self.e_pub

    def _start(self, e: bytes) -> None:
        pe = X25519PublicKey.from_public_bytes(e)
        ee = self._e.exchange(pe)
        out = session_key(ee, self._s.exchange(pe), self._e.exchange(self._peer_s), self.e_pub, e,
                          self.deployment, self.me, self.peer)
        back = session_key(ee, self._e.exchange(self._peer_s), self._s.exchange(pe), e, self.e_pub,
                           self.deployment, self.peer, self.me)
        if self.peer_e is not None:  # the earlier run's frames are void, even those still in flight
            self._recv.pop(session_id(self.peer_e, self.e_pub), None)
        self.peer_e = e
        self._send = (session_id(self.e_pub, e), _Session(AESGCM(out)))
        self._recv[session_id(e, self.e_pub)] = _Session(AESGCM(back))

    # --------------------------------------------------------------- frames
    def seal(self, topic: str, *parts: bytes | memoryview) -> bytearray:
        """Seal the concatenation of ``parts`` under the current session (assembled once, encrypted in
        place after the prefix)."""
        if self._send is None:
            raise ProtocolError(f"no session with {self.peer} yet (handshake pending)")
        sid, s = self._send
        s.last += 1
        prefix = MAGIC + sid + struct.pack(">Q", s.last)
        body = b"".join(parts)
        out = bytearray(PREFIX + len(body) + TAG)
        out[:PREFIX] = prefix
        s.aead.encrypt_into(b"\0\0\0\0" + prefix[20:], body, prefix + topic.encode(), memoryview(out)[PREFIX:])
        return out

    def open(self, topic: str, message: bytes | bytearray) -> memoryview:
        """The plaintext (a view, no copy) of a sealed message, or ProtocolError."""
        if len(message) < PREFIX + TAG or message[:4] != MAGIC:
            raise ProtocolError("message is not a sealed blindseg frame")
        s = self._recv.get(bytes(message[4:20]))
        if s is None:
            raise UnknownSession(f"message from an unknown session (another run of {self.peer}, or a replay)")
        (counter,) = struct.unpack(">Q", message[20:28])
        if counter <= s.last:
            raise ProtocolError(f"replayed or reordered message (counter {counter} after {s.last})")
        body = bytearray(len(message) - PREFIX - TAG)
        try:
            s.aead.decrypt_into(b"\0\0\0\0" + bytes(message[20:28]), memoryview(message)[PREFIX:],
                                bytes(message[:PREFIX]) + topic.encode(), body)
        except InvalidTag:
            raise ProtocolError("message failed authentication (tampered, wrong key or wrong topic)") from None
        s.last = counter
        return memoryview(body)


class PresenceSeal:
    """Seals a service's presence documents for one reader (and opens them at the reader): AES-256-GCM
    under HKDF(DH(s_service, s_reader), info = "blindseg/2 presence <deployment> <service>-><reader>").

    ``b"BSP2" | nonce (12) | AES-GCM(document, AAD = prefix + topic)``. Only that reader can read it and
    only that service can have written it; there is no forward secrecy (a document is counts and epochs,
    never a key or a share) and no replay protection beyond the document's own time, which the reader
    shows -- a presence document informs a person and decides nothing."""

    def __init__(self, key: X25519PrivateKey, other: X25519PublicKey, deployment: str, service: str,
                 reader: str, purpose: str = "presence") -> None:
        """``purpose`` separates the keys of different uses of the same pair of identities ("presence";
        "offer": a data owner's job offer to one server pair, :class:`~blindseg.messages.Offer`)."""
        self._aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=None,
                                 info=f"blindseg/2 {purpose} {deployment} {service}->{reader}".encode()
                                 ).derive(key.exchange(other)))

    def __repr__(self) -> str:
        return "PresenceSeal(...)"

    def seal(self, topic: str, document: bytes) -> bytes:
        import os

        nonce = os.urandom(12)
        return PRESENCE + nonce + self._aead.encrypt(nonce, document, PRESENCE + nonce + topic.encode())

    def open(self, topic: str, message: bytes) -> bytes:
        if len(message) < 4 + 12 + TAG or message[:4] != PRESENCE:
            raise ProtocolError("not a sealed presence document")
        try:
            return self._aead.decrypt(message[4:16], message[16:], message[:16] + topic.encode())
        except InvalidTag:
            raise ProtocolError("presence document does not authenticate") from None
