"""End-to-end encryption between two parties: X25519 -> HKDF-SHA256 -> AES-256-GCM.

Every party has a static X25519 key pair; the deployment kit (``blindseg init``)
gives each party the others' public keys. For each message direction
(sender -> receiver) the sender starts a *session* with a fresh random 16-byte
id; the key is ``HKDF(X25519(sk_sender, pk_receiver), salt=session id,
info="blindseg/1 <deployment> <sender>-><receiver>")``, so a restarted sender
never reuses a (key, nonce) pair, and the two directions never share a key.

Sealed message::

    b"BSE1" | session id (16) | counter (8, big endian) | AES-GCM(ciphertext + 16-byte tag)

nonce = 4 zero bytes | counter; AAD = the 28-byte prefix + topic. The receiver
rejects (with :class:`~blindseg.errors.ProtocolError`) anything that does not
authenticate, a counter that does not increase within a session (replay or
reorder), and a message whose sealed timestamp is more than ``max_age``
seconds old (a replay of an earlier session).
"""

from __future__ import annotations

import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError, UsageError

MAGIC = b"BSE1"
PREFIX = 4 + 16 + 8
TAG = 16
OVERHEAD = PREFIX + TAG + 8  # + the sealed timestamp


def generate_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


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


def _derive(shared: bytes, session: bytes, deployment: str, sender: str, receiver: str) -> AESGCM:
    info = f"blindseg/1 {deployment} {sender}->{receiver}".encode()
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=session, info=info).derive(shared))


class Sealer:
    """Sender side of one direction: a session id and a nonce counter."""

    def __init__(self, key: X25519PrivateKey, peer: X25519PublicKey, deployment: str, sender: str,
                 receiver: str) -> None:
        self.session = os.urandom(16)
        self._aead = _derive(key.exchange(peer), self.session, deployment, sender, receiver)
        self._counter = 0

    def seal(self, topic: str, *parts: bytes | memoryview) -> bytearray:
        """Seal the concatenation of ``parts`` (assembled once, encrypted in place after the prefix)."""
        self._counter += 1
        prefix = MAGIC + self.session + struct.pack(">Q", self._counter)
        nonce = b"\0\0\0\0" + prefix[20:]
        body = bytearray(8 + sum(len(p) for p in parts))
        body[:8] = struct.pack(">d", time.time())
        off = 8
        for p in parts:
            body[off:off + len(p)] = p
            off += len(p)
        out = bytearray(PREFIX + len(body) + TAG)
        out[:PREFIX] = prefix
        self._aead.encrypt_into(nonce, body, prefix + topic.encode(), memoryview(out)[PREFIX:])
        return out


class Opener:
    """Receiver side of one direction: accepts each sender session's counters strictly increasing."""

    def __init__(self, key: X25519PrivateKey, peer: X25519PublicKey, deployment: str, sender: str,
                 receiver: str, max_age: float = 300.0) -> None:
        self._shared = key.exchange(peer)
        self._ctx = (deployment, sender, receiver)
        self._sessions: dict[bytes, tuple[AESGCM, int]] = {}
        self.max_age = max_age

    def open(self, topic: str, message: bytes | bytearray) -> memoryview:
        """The plaintext (a view, no copy) of a sealed message, or ProtocolError."""
        if len(message) < PREFIX + TAG + 8 or message[:4] != MAGIC:
            raise ProtocolError("message is not a sealed blindseg frame")
        session, (counter,) = bytes(message[4:20]), struct.unpack(">Q", message[20:28])
        aead, last = self._sessions.get(session) or (_derive(self._shared, session, *self._ctx), 0)
        if counter <= last:
            raise ProtocolError(f"replayed or reordered message (counter {counter} after {last})")
        body = bytearray(len(message) - PREFIX - TAG)
        try:
            aead.decrypt_into(b"\0\0\0\0" + bytes(message[20:28]), memoryview(message)[PREFIX:],
                              bytes(message[:PREFIX]) + topic.encode(), body)
        except InvalidTag:
            raise ProtocolError("message failed authentication (tampered, wrong key or wrong topic)") from None
        (ts,) = struct.unpack(">d", body[:8])
        if abs(time.time() - ts) > self.max_age:
            raise ProtocolError("message is older than the replay window")
        if len(self._sessions) > 64 and session not in self._sessions:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[session] = (aead, counter)
        return memoryview(body)[8:]
