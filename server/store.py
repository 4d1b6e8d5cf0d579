"""A server's durable bundle store: single-use preprocessing on disk.

Layout under the server's state directory::

    bundles.sqlite        one row per bundle: id, model, batch, party, seed, state, job, index
    bundles/<id>.bin      the arrays a bundle leaves after offline work, op by op
                          (server 1's corrections, both servers' F_i = C_i + f(A_i, E) + bias_i)

States: ``receiving`` -> ``ready`` -> ``consumed``. :meth:`BundleStore.consume`
flips ``ready`` to ``consumed`` in one durable sqlite transaction (synchronous
FULL) *before* the first opening that uses the bundle, so after a crash or a
restart a bundle is never used twice (DESIGN.md section 8, invariant 2).
Material is read back op by op (``np.fromfile`` at the op's offset), so a job
never holds more than one op's preprocessing in memory.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np

from blindseg.errors import ProtocolError, StoreFull, UsageError
from blindseg.state import check_private, private_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    batch INTEGER NOT NULL,
    party INTEGER NOT NULL,
    seed BLOB NOT NULL,
    state TEXT NOT NULL,
    job TEXT,
    idx BLOB,
    created REAL NOT NULL
)
"""

IndexEntry = tuple[int, str, tuple[int, ...]]  # offset, dtype string, shape


class BundleWriter:
    """Appends one bundle's arrays op by op; :meth:`commit` makes it ``ready``."""

    def __init__(self, store: BundleStore, bundle_id: str, path: Path) -> None:
        self._store = store
        self.bundle_id = bundle_id
        self._path = path
        self._f: BinaryIO | None = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        self._offset = 0
        self.index: dict[int, list[IndexEntry]] = {}

    def put(self, op: int, arrays: list[np.ndarray]) -> None:
        """Store ``arrays`` as op ``op``'s material (called once per op, in any order). A write the disk
        cannot take raises StoreFull (the caller aborts the bundle)."""
        if self._f is None:
            raise UsageError("bundle writer is closed")
        if op in self.index:
            raise ProtocolError(f"bundle {self.bundle_id} has op {op} twice")
        entries: list[IndexEntry] = []
        need = sum(np.asarray(a).nbytes for a in arrays)
        self._store.check_room(need, f"bundle {self.bundle_id[:8]}", budget=False)
        try:
            for a in arrays:
                a = np.ascontiguousarray(a)
                self._f.write(a.data)
                entries.append((self._offset, a.dtype.str, tuple(a.shape)))
                self._offset += a.nbytes
        except OSError as e:
            raise StoreFull(f"{self._store.root}: cannot write bundle {self.bundle_id[:8]} ({e.strerror})") from None
        self.index[op] = entries

    def commit(self) -> None:
        """fsync the data, then mark the bundle ready (durable)."""
        if self._f is None:
            raise UsageError("bundle writer is closed")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            self._store._mark_ready(self.bundle_id, self.index)
        except (OSError, sqlite3.OperationalError) as e:
            raise StoreFull(f"{self._store.root}: cannot commit bundle {self.bundle_id[:8]} ({e})") from None

    def abort(self) -> None:
        """Drop a partly received bundle (nothing half-written stays usable); never fails itself, even on
        a full disk (a row it cannot delete stays 'receiving', which nothing uses and the next start drops)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None
        self._path.unlink(missing_ok=True)
        with contextlib.suppress(sqlite3.Error):
            self._store._forget(self.bundle_id)


@dataclass
class StoredBundle:
    """A consumed bundle's stored arrays, read op by op."""

    bundle_id: str
    model: str
    batch: int
    party: int
    seed: bytes
    path: Path
    index: dict[int, list[IndexEntry]]

    def arrays(self, op: int) -> list[np.ndarray]:
        """Op ``op``'s stored arrays, read into memory."""
        out = []
        for offset, dtype, shape in self.index.get(op, []):
            dt = np.dtype(dtype)
            count = int(np.prod(shape))
            try:
                arr = np.fromfile(self.path, dtype=dt, count=count, offset=offset)
            except FileNotFoundError:  # burnt or used meanwhile (a warm-up racing the agreement)
                raise ProtocolError(f"bundle {self.bundle_id} is gone from the store (burnt or used)") from None
            if arr.size != count:
                raise ProtocolError(f"bundle {self.bundle_id} is truncated on disk (op {op})")
            out.append(arr.reshape(shape))
        return out


class BundleStore:
    """sqlite-indexed, file-backed bundles for one server (see module docstring)."""

    MIN_FREE = 64 << 20  # bytes the disk must keep free after a write (sqlite, logs, the models)

    def __init__(self, root: str | Path, budget: int = 0) -> None:
        """``budget``: the most bytes the store may hold on disk (0: as much as the disk allows)."""
        self.root, self.budget = Path(root), budget
        private_dir(self.root)
        private_dir(self.root / "bundles")
        db = self.root / "bundles.sqlite"
        if db.exists():
            check_private(db)
        else:
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db.execute("CREATE INDEX IF NOT EXISTS bundles_job ON bundles (job)")
        # a bundle still "receiving" after a restart was cut off mid-transfer: drop it
        for (bid,) in self._db.execute("SELECT id FROM bundles WHERE state = 'receiving'").fetchall():
            self._forget(bid)

    def close(self) -> None:
        self._db.close()

    def _file(self, bundle_id: str) -> Path:
        if not bundle_id.isalnum() or len(bundle_id) > 64:
            raise ProtocolError("bundle id must be 1-64 alphanumeric characters")
        return self.root / "bundles" / f"{bundle_id}.bin"

    def check_room(self, nbytes: int, what: str, budget: bool = True) -> None:
        """StoreFull if ``nbytes`` more would exceed the budget (if ``budget``) or leave the disk under
        MIN_FREE."""
        import shutil

        if budget and self.budget and self.disk_bytes() + nbytes > self.budget:
            raise StoreFull(f"{self.root}: {what} ({nbytes / 2**20:.1f} MiB) does not fit the store budget of "
                            f"{self.budget / 2**20:.0f} MiB ({self.disk_bytes() / 2**20:.1f} MiB in use)")
        free = shutil.disk_usage(self.root).free
        if free - nbytes < self.MIN_FREE:
            raise StoreFull(f"{self.root}: the disk is full ({free / 2**20:.1f} MiB free; {what} needs "
                            f"{nbytes / 2**20:.1f} MiB and {self.MIN_FREE >> 20} MiB must stay free)")

    def size_hint(self, model: str, batch: int) -> int:
        """Bytes on disk of the newest ready bundle of (deployment, batch): what the next one will take."""
        for bid in reversed(self.ready(model, batch)):
            with contextlib.suppress(FileNotFoundError):
                return self._file(bid).stat().st_size
        return 0

    def writer(self, bundle_id: str, model: str, batch: int, party: int, seed: bytes) -> BundleWriter:
        """Start receiving a new bundle; an id seen before (in any state) is refused, and one that would
        not fit the budget (judged by the last bundle of its kind) or the disk is StoreFull."""
        path = self._file(bundle_id)
        self.check_room(self.size_hint(model, batch), f"bundle {bundle_id[:8]}")
        try:
            self._db.execute(
                "INSERT INTO bundles (id, model, batch, party, seed, state, created) VALUES (?, ?, ?, ?, ?, 'receiving', ?)",
                (bundle_id, model, batch, party, seed, time.time()),
            )
        except sqlite3.IntegrityError:
            raise ProtocolError(f"bundle {bundle_id} was already received; bundles are single-use") from None
        except sqlite3.OperationalError as e:
            raise StoreFull(f"{self.root}: cannot record bundle {bundle_id[:8]} ({e})") from None
        try:
            return BundleWriter(self, bundle_id, path)
        except OSError as e:
            with contextlib.suppress(sqlite3.Error):
                self._forget(bundle_id)
            raise StoreFull(f"{self.root}: cannot create bundle {bundle_id[:8]} ({e.strerror})") from None

    def _mark_ready(self, bundle_id: str, index: dict[int, list[IndexEntry]]) -> None:
        blob = msgpack.packb({str(k): [[o, d, list(s)] for o, d, s in v] for k, v in index.items()})
        self._db.execute("UPDATE bundles SET state = 'ready', idx = ? WHERE id = ? AND state = 'receiving'", (blob, bundle_id))

    def _forget(self, bundle_id: str) -> None:
        self._db.execute("DELETE FROM bundles WHERE id = ? AND state = 'receiving'", (bundle_id,))
        self._file(bundle_id).unlink(missing_ok=True)

    def ready(self, model: str | None = None, batch: int | None = None) -> list[str]:
        """Ids of ready bundles (oldest first), optionally for one model and batch."""
        rows = self._db.execute("SELECT id, model, batch FROM bundles WHERE state = 'ready' ORDER BY created").fetchall()
        return [r[0] for r in rows if (model is None or r[1] == model) and (batch is None or r[2] == batch)]

    def summary(self) -> dict[str, dict[int, int]]:
        """Ready bundles per deployment and batch size."""
        out: dict[str, dict[int, int]] = {}
        for m, b, n in self._db.execute("SELECT model, batch, COUNT(*) FROM bundles WHERE state = 'ready' "
                                        "GROUP BY model, batch").fetchall():
            out.setdefault(str(m), {})[int(b)] = int(n)
        return out

    def disk_bytes(self) -> int:
        """Bytes of bundle files and the index on disk."""
        total = 0
        for f in [*(self.root / "bundles").iterdir(), *self.root.glob("bundles.sqlite*")]:
            with contextlib.suppress(FileNotFoundError):  # a bundle dropped meanwhile
                total += f.stat().st_size
        return total

    def known(self, model: str, batch: int) -> list[str]:
        """Ids of bundles of (deployment, batch) that are ready or still arriving."""
        rows = self._db.execute("SELECT id FROM bundles WHERE model = ? AND batch = ? AND state IN "
                                "('ready', 'receiving') ORDER BY created", (model, batch)).fetchall()
        return [str(r[0]) for r in rows]

    def purge(self, model: str, keep: str) -> int:
        """Drop the ready bundles of ``model``'s deployments other than ``keep`` (a redeploy); returns how many."""
        rows = self._db.execute("SELECT id, model FROM bundles WHERE state = 'ready'").fetchall()
        gone = [bid for bid, m in rows if m.split("@")[0] == model and m != keep]
        for bid in gone:
            self.drop(bid, "redeployed")
        return len(gone)

    def drop(self, bundle_id: str, why: str) -> None:
        """Retire a ready bundle unused (a redeploy, an expired pool): never used, never accepted again."""
        self._db.execute("UPDATE bundles SET state = 'consumed', job = ? WHERE id = ? AND state = 'ready'",
                         (why, bundle_id))
        self.discard(bundle_id)

    def model_of(self, bundle_id: str) -> str | None:
        row = self._db.execute("SELECT model FROM bundles WHERE id = ?", (bundle_id,)).fetchone()
        return None if row is None else str(row[0])

    def state(self, bundle_id: str) -> str | None:
        row = self._db.execute("SELECT state FROM bundles WHERE id = ?", (bundle_id,)).fetchone()
        return None if row is None else str(row[0])

    def job_seen(self, job: str) -> bool:
        """Whether a bundle was ever consumed by ``job`` (duplicate job ids, across restarts)."""
        return self._db.execute("SELECT 1 FROM bundles WHERE job = ? LIMIT 1", (job,)).fetchone() is not None

    def consume(self, bundle_id: str, job: str) -> StoredBundle:
        """Mark ``bundle_id`` consumed by ``job`` (durably, before any use) and return it.

        Raises :class:`ProtocolError` if the bundle is unknown, still arriving or
        already consumed -- reusing preprocessing would leak the inputs.
        """
        cur = self._db.execute(
            "UPDATE bundles SET state = 'consumed', job = ? WHERE id = ? AND state = 'ready'", (job, bundle_id)
        )
        if cur.rowcount != 1:
            st = self.state(bundle_id)
            why = "unknown" if st is None else "already consumed" if st == "consumed" else f"not ready ({st})"
            raise ProtocolError(f"bundle {bundle_id} cannot be used: {why}; preprocessing is single-use")
        return self._stored(bundle_id)

    def peek(self, bundle_id: str) -> StoredBundle:
        """A ready bundle's arrays without consuming it (to expand material ahead of the job)."""
        if self.state(bundle_id) != "ready":
            raise ProtocolError(f"bundle {bundle_id} is not ready")
        return self._stored(bundle_id)

    def _stored(self, bundle_id: str) -> StoredBundle:
        row = self._db.execute("SELECT model, batch, party, seed, idx FROM bundles WHERE id = ?", (bundle_id,)).fetchone()
        raw = msgpack.unpackb(row[4], strict_map_key=False)
        index = {int(k): [(int(o), str(d), tuple(int(x) for x in s)) for o, d, s in v] for k, v in raw.items()}
        return StoredBundle(bundle_id, row[0], int(row[1]), int(row[2]), bytes(row[3]), self._file(bundle_id), index)

    def discard(self, bundle_id: str) -> None:
        """Delete a consumed bundle's data (its row stays, so the id is never accepted again)."""
        self._file(bundle_id).unlink(missing_ok=True)
