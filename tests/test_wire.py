"""Frame round-trips and malformed frames (never a crash, always ProtocolError)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindseg.errors import ProtocolError
from blindseg.wire import decode_frame, encode_frame


def test_roundtrip() -> None:
    arrays = [np.arange(12, dtype=np.uint32).reshape(3, 4), np.arange(5, dtype=np.uint64), np.zeros(0, np.uint8)]
    h, out = decode_frame(encode_frame({"t": "open", "l": "j:1:0"}, arrays))
    assert h == {"t": "open", "l": "j:1:0"}
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


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
    for buf in (data, b"BSG1" + data, b"BSG1" + len(data).to_bytes(4, "big") + data):
        try:
            decode_frame(buf)
        except ProtocolError:
            pass
