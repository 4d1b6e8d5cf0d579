"""Frame round-trips and malformed frames (never a crash, always ProtocolError)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindseg.errors import ProtocolError
from blindseg.wire import ALIGN, MAGIC, decode_frame, encode_frame


def test_roundtrip() -> None:
    arrays = [np.arange(12, dtype=np.uint32).reshape(3, 4), np.arange(5, dtype=np.uint64), np.zeros(0, np.uint8)]
    h, out = decode_frame(encode_frame({"t": "open", "l": "j:1:0"}, arrays))
    assert h == {"t": "open", "l": "j:1:0"}
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@pytest.mark.parametrize("label", ["j", "job:1:0", "a-much-longer-label:123:45", "x" * 61])
def test_arrays_are_aligned_views(label: str) -> None:
    """Whatever the header's length, each array starts at a multiple of ALIGN from the frame's start, so
    views (copy=False) are aligned; a frame at an odd address still decodes to aligned arrays (copied)."""
    arrays = [np.arange(7, dtype=np.uint32), np.arange(3, dtype=np.uint64), np.arange(5, dtype=np.uint8),
              np.arange(4, dtype=np.uint64)]
    frame = encode_frame({"t": "open", "l": label}, arrays)
    _, out = decode_frame(frame, copy=False)
    base = np.frombuffer(frame, np.uint8).ctypes.data
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.flags.aligned and (b.ctypes.data - base) % ALIGN == 0 and not b.flags.owndata
    shifted = bytearray(len(frame) + 1)
    shifted[1:] = frame
    _, out = decode_frame(memoryview(shifted)[1:], copy=False)
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.flags.aligned


def test_nonzero_padding_is_refused() -> None:
    frame = encode_frame({"t": "x"}, [np.arange(3, dtype=np.uint32), np.arange(2, dtype=np.uint64)])
    bad = bytearray(frame)
    bad[len(frame) - 16 - 1] = 1  # the last pad byte before the uint64 array (12 bytes of uint32, 4 of pad)
    with pytest.raises(ProtocolError, match="padding"):
        decode_frame(bytes(bad))


def test_refuses_bad_dtype() -> None:
    with pytest.raises(ValueError):
        encode_frame({}, [np.zeros(3, dtype=np.float64)])


@pytest.mark.parametrize("cut", [0, 3, 7, 9, 20, -1])
def test_truncated_frames(cut: int) -> None:
    frame = encode_frame({"t": "x"}, [np.arange(10, dtype=np.uint32)])
    with pytest.raises(ProtocolError):
        decode_frame(frame[:cut])


def test_oversized_and_trailing() -> None:
    frame = encode_frame({"t": "x"}, [np.arange(10, dtype=np.uint32)])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_frame(frame, max_bytes=10)
    with pytest.raises(ProtocolError, match="trailing"):
        decode_frame(frame + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoder_never_crashes(data: bytes) -> None:
    for buf in (data, MAGIC + data, MAGIC + len(data).to_bytes(4, "big") + data):
        try:
            decode_frame(buf)
        except ProtocolError:
            pass
