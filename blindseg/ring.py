"""Ring Z_2^32 and fixed-point encoding.

Shares are ``uint32`` arrays; numpy's wrap-around is the reduction mod 2^32.
A real value v with f fraction bits is encoded as round(v * 2^f) mod 2^32 in
two's complement. Signed views are ``int32``.
"""

from __future__ import annotations

import numpy as np

from .errors import ScaleOverflowError, UsageError
from .prg import Prg

RING_BITS = 32
#: Every value entering a truncation or comparison must lie in [-LIMIT, LIMIT).
LIMIT = 1 << 30


def encode(x: np.ndarray, frac_bits: int, what: str = "value") -> np.ndarray:
    """Fixed-point encode a float array; refuses NaN/inf and values outside the ring range."""
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise UsageError(f"{what} contains NaN or infinite values")
    scaled = np.rint(a * float(1 << frac_bits))
    if scaled.size and np.max(np.abs(scaled)) >= LIMIT:
        raise ScaleOverflowError(
            f"{what} does not fit the ring at {frac_bits} fraction bits "
            f"(max |v| * 2^f = 2^{np.log2(np.max(np.abs(scaled))):.1f} >= 2^30)"
        )
    return scaled.astype(np.int64).astype(np.uint32)


def decode(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """Decode ring elements (two's complement) to float64."""
    return np.asarray(x, dtype=np.uint32).view(np.int32).astype(np.float64) / float(1 << frac_bits)


def signed(x: np.ndarray) -> np.ndarray:
    """Two's-complement view of ring elements as int64."""
    return np.asarray(x, dtype=np.uint32).view(np.int32).astype(np.int64)


def share(x: np.ndarray, prg: Prg) -> tuple[np.ndarray, np.ndarray]:
    """Additive 2-out-of-2 sharing: x0 uniform from ``prg``, x1 = x - x0."""
    x = np.ascontiguousarray(x, dtype=np.uint32)
    x0 = prg.uint32(x.shape)
    return x0, x - x0


def reconstruct(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """x0 + x1 mod 2^32."""
    return (np.asarray(x0, dtype=np.uint32) + np.asarray(x1, dtype=np.uint32)).astype(np.uint32)
