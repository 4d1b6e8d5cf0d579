"""Cryptographic PRG: AES-256-CTR keystream from a 32-byte seed (``cryptography``).

Every random value any party or the dealer draws comes from here. Draws are
sequential: two PRGs with the same seed yield the same stream, which is how the
dealer and a server agree on seeded shares without sending them.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_BLOCK = 16


def new_seed() -> bytes:
    """A fresh uniformly random seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


class Prg:
    """AES-256-CTR keystream; ``update_into`` a reused buffer (~10+ GB/s)."""

    def __init__(self, seed: bytes, stream: int = 0) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        # Independent streams per (seed, stream): the stream index fills the high
        # half of the CTR block, the block counter the low half.
        nonce = int(stream).to_bytes(8, "big") + b"\x00" * 8
        cipher = Cipher(algorithms.AES(seed), modes.CTR(nonce))
        self._enc = cipher.encryptor()
        self._zeros = np.zeros(0, dtype=np.uint8)
        self.drawn = 0

    def bytes_(self, n: int) -> np.ndarray:
        """``n`` pseudorandom bytes as a fresh uint8 array."""
        if self._zeros.size < n:
            self._zeros = np.zeros(max(n, 1 << 16), dtype=np.uint8)
        out = np.empty(n + _BLOCK - 1, dtype=np.uint8)
        written = self._enc.update_into(self._zeros[:n].data, out.data)
        if written != n:  # CTR mode is a stream cipher: never buffers
            raise RuntimeError("AES-CTR returned a short keystream")
        self.drawn += n
        return out[:n]

    def uint32(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform ring elements of Z_2^32."""
        n = int(np.prod(shape))
        return self.bytes_(4 * n).view(np.uint32).reshape(shape)

    def uint64(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform 64-bit words (bit-sliced boolean shares)."""
        n = int(np.prod(shape))
        return self.bytes_(8 * n).view(np.uint64).reshape(shape)
