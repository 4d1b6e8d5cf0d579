"""Frames: ``BSG2`` | u32 header length | msgpack header | raw array bytes.

The header names the frame type, its label fields and each array's dtype and
shape; each array starts at the next multiple of :data:`ALIGN` bytes from the frame's start (zero
padding between), so a receiver's views are aligned (numpy combines unaligned uint32 / uint64 views
2-3x slower). Decoding validates everything against an
allowlist of dtypes and a size limit before touching the payload, so a
malformed frame raises :class:`ProtocolError` and never allocates more than
the frame holds. Never pickles.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError

MAGIC = b"BSG2"  # BSG1: the same without alignment (until session 10)
ALIGN = 16
DTYPES = {"<u4": np.uint32, "<u8": np.uint64, "<u2": np.uint16, "|u1": np.uint8}
MAX_FRAME = 1 << 34
MAX_ARRAYS = 4096


def encode_frame(header: dict[str, Any], arrays: list[np.ndarray] | tuple[np.ndarray, ...] = ()) -> bytes:
    """Serialize a header and arrays (C order) into one frame (each array copied once, into place)."""
    specs = []
    for a in arrays:
        key = a.dtype.str
        if key not in DTYPES:
            raise ValueError(f"dtype {a.dtype} is not allowed on the wire")
        specs.append([key, list(a.shape)])
    head = msgpack.packb({**header, "arrays": specs}, use_bin_type=True)
    offs, end = _offsets(8 + len(head), [a.nbytes for a in arrays])
    buf = bytearray(end)
    buf[:4], buf[4:8], buf[8:8 + len(head)] = MAGIC, len(head).to_bytes(4, "big"), head
    for a, off in zip(arrays, offs, strict=True):
        if a.nbytes:
            np.copyto(np.frombuffer(buf, a.dtype, a.size, off).reshape(a.shape), a, casting="no")
    return buf  # type: ignore[return-value]  # a bytes-like frame; nobody writes to it after this


def _offsets(start: int, sizes: list[int]) -> tuple[list[int], int]:
    """Each array's offset (the next multiple of ALIGN from ``start``) and the frame's length."""
    offs, off = [], start
    for n in sizes:
        off += -off % ALIGN
        offs.append(off)
        off += n
    return offs, off


def decode_frame(buf: bytes | memoryview, max_bytes: int = MAX_FRAME, copy: bool = True
                 ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Parse and validate a frame; raises ProtocolError naming what is wrong. ``copy=False``: the arrays
    are views of ``buf`` (for a reader that only reads them and drops the frame)."""
    mv = memoryview(buf)
    if len(mv) > max_bytes:
        raise ProtocolError(f"frame of {len(mv)} bytes exceeds the {max_bytes}-byte limit")
    if len(mv) < 8 or bytes(mv[:4]) != MAGIC:
        raise ProtocolError(f"frame does not start with the {MAGIC.decode()} magic (a peer of another blindseg "
                            "version?)")
    hlen = int.from_bytes(mv[4:8], "big")
    if hlen > len(mv) - 8:
        raise ProtocolError("frame header length runs past the end of the frame")
    try:
        header = msgpack.unpackb(mv[8 : 8 + hlen], raw=False, strict_map_key=True, max_bin_len=1 << 16)
    except Exception as exc:  # msgpack raises several types
        raise ProtocolError(f"frame header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ProtocolError("frame header is not a map with an 'arrays' list")
    specs = header.pop("arrays")
    if len(specs) > MAX_ARRAYS:
        raise ProtocolError(f"frame declares {len(specs)} arrays (limit {MAX_ARRAYS})")
    arrays = []
    off = 8 + hlen
    for spec in specs:
        pad = -off % ALIGN
        if mv[off : off + pad] != bytes(pad):
            raise ProtocolError("frame has non-zero padding before an array")
        off += pad
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in DTYPES or not isinstance(spec[1], list)
                or not all(isinstance(s, int) and 0 <= s < 1 << 40 for s in spec[1]) or len(spec[1]) > 8):
            raise ProtocolError("frame declares an invalid array dtype or shape")
        dt = np.dtype(DTYPES[spec[0]])
        n = math.prod(spec[1]) * dt.itemsize
        if off + n > len(mv):
            raise ProtocolError("frame payload is shorter than its header declares")
        view = np.frombuffer(mv[off : off + n], dtype=dt).reshape(spec[1])
        arrays.append(view.copy() if copy or not view.flags.aligned else view)  # a frame at an odd address
        off += n
    if off != len(mv):
        raise ProtocolError("frame has trailing bytes after its declared arrays")
    return header, arrays
