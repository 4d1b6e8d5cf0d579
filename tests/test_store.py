"""The durable bundle store: arrays round-trip, bundles are single-use across restarts."""

from __future__ import annotations

import numpy as np
import pytest

from blindseg.errors import ProtocolError
from server.store import BundleStore


def _write(store: BundleStore, bid: str, commit: bool = True) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 2**32, (3, 5), dtype=np.uint32), rng.integers(0, 2**64, (7,), dtype=np.uint64),
              rng.integers(0, 256, (4, 2), dtype=np.uint8)]
    w = store.writer(bid, "m", 2, 1, b"s" * 32)
    w.put(3, arrays[:2])
    w.put(1, arrays[2:])
    if commit:
        w.commit()
    return arrays


def test_arrays_round_trip_by_op(tmp_path):
    store = BundleStore(tmp_path)
    arrays = _write(store, "b1")
    assert store.ready("m", 2) == ["b1"]
    b = store.consume("b1", "job1")
    got3, got1 = b.arrays(3), b.arrays(1)
    for a, g in zip(arrays, got3 + got1, strict=True):
        assert g.dtype == a.dtype and np.array_equal(a, g)
    assert b.arrays(0) == [] and b.seed == b"s" * 32 and b.batch == 2


def test_a_bundle_is_consumed_once_even_after_restart(tmp_path):
    store = BundleStore(tmp_path)
    _write(store, "b1")
    store.consume("b1", "job1")
    with pytest.raises(ProtocolError, match="already consumed"):
        store.consume("b1", "job2")
    store.close()
    again = BundleStore(tmp_path)  # a restarted server
    with pytest.raises(ProtocolError, match="already consumed"):
        again.consume("b1", "job3")
    with pytest.raises(ProtocolError, match="single-use"):
        again.writer("b1", "m", 2, 1, b"s" * 32)  # a re-sent copy of a used bundle is refused too
    assert again.ready() == []


def test_a_bundle_cut_off_mid_transfer_is_dropped_on_restart(tmp_path):
    store = BundleStore(tmp_path)
    _write(store, "b2", commit=False)
    with pytest.raises(ProtocolError, match="not ready"):
        store.consume("b2", "job")
    store.close()
    again = BundleStore(tmp_path)
    assert again.state("b2") is None and not (tmp_path / "bundles" / "b2.bin").exists()
    with pytest.raises(ProtocolError, match="unknown"):
        again.consume("b2", "job")


def test_truncated_file_and_bad_ids_are_refused(tmp_path):
    store = BundleStore(tmp_path)
    _write(store, "b3")
    b = store.consume("b3", "job")
    with open(b.path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ProtocolError, match="truncated"):
        b.arrays(3)
    with pytest.raises(ProtocolError, match="alphanumeric"):
        store.writer("../etc", "m", 1, 0, b"s" * 32)
