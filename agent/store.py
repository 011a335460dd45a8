"""The agent's durable state: the topology document, its revision, what each
VPC namespace was last programmed with, and a few lab settings.

SQLite in WAL mode with ``synchronous=FULL``: every write below is one
transaction, so a crash (even SIGKILL or power loss) leaves either the old or
the new state, never a mix. A journal append may defer its fsync
(`append_mutation(sync=False)` + `sync_journal()`, which together are FULL) so
that the control plane overlaps it with the kernel commit. The raw topology
is stored, not the compiled program: the program is derived and may change
with the compiler. The
"applied" records say which revision each router enforces (what `lab up`
waits for); whether the kernel really holds the program is checked by content
against the kernel's listing, never assumed from a record.

Between two documents, the control plane (agent/control.py) appends accepted
API calls to the `mutations` journal, one row and one transaction per call;
the current model is the document replayed with the journal after it
(agent/datastore.py). The current revision is the highest of both. Saving a
document supersedes the journal in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/var/lib/nftsg/state.db"
ENV_VAR = "NFTSG_STATE_DB"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topology (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    revision  INTEGER NOT NULL,
    document  TEXT    NOT NULL,
    digest    TEXT    NOT NULL,
    saved_at  REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    namespace  TEXT PRIMARY KEY,
    revision   INTEGER NOT NULL,
    digest     TEXT    NOT NULL,
    applied_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS mutations (
    revision  INTEGER PRIMARY KEY,
    action    TEXT    NOT NULL,
    params    TEXT    NOT NULL,
    at        TEXT    NOT NULL,
    digest    TEXT    NOT NULL,
    saved_at  REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The state store cannot be opened or its content is inconsistent."""


@dataclass(frozen=True)
class AppliedRecord:
    namespace: str
    revision: int
    digest: str  # sha256 of the canonical topology document whose program is in force
    applied_at: float


@dataclass(frozen=True)
class StoredState:
    revision: int
    topology: dict[str, Any]
    digest: str  # sha256 of the canonical topology JSON
    saved_at: float
    applied: dict[str, AppliedRecord]


def canonical_json(doc: Any) -> str:
    """Key-sorted compact JSON: equal documents give equal text and digests."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(doc: Any) -> str:
    """sha256 of the canonical JSON of `doc` (for topologies and programs)."""
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def default_path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


class Store:
    """One SQLite database; safe to share between threads of one process."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path if path is not None else default_path())
        # The store may hold API credentials (other modules' settings): keep
        # it private to root.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            if fresh:
                os.chmod(self.path, 0o600)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            # Deferred syncs (append_mutation(sync=False)) rely on the WAL.
            self._wal = bool(mode) and str(mode[0]).lower() == "wal"
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            with self._transaction():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc

    # -- transactions ------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock up front, so a read-modify-write
            # (revision + 1) cannot interleave with another writer.
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")

    def _transaction(self) -> Store._Tx:
        return Store._Tx(self._db)

    # -- topology ------------------------------------------------------------

    def load(self) -> StoredState | None:
        """The stored topology with its revision and applied records, or None."""
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot for both tables
            try:
                row = self._db.execute(
                    "SELECT revision, document, digest, saved_at FROM topology WHERE id = 1"
                ).fetchone()
                applied = self._db.execute(
                    "SELECT namespace, revision, digest, applied_at FROM applied"
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        if row is None:
            return None
        revision, document, doc_digest, saved_at = row
        if hashlib.sha256(document.encode()).hexdigest() != doc_digest:
            raise StoreError(f"state store {self.path}: topology does not match its digest")
        return StoredState(
            revision=revision,
            topology=json.loads(document),
            digest=doc_digest,
            saved_at=saved_at,
            applied={ns: AppliedRecord(ns, rev, dg, at) for ns, rev, dg, at in applied},
        )

    def revision(self) -> int:
        """The current revision, journal included (0 before the first save)."""
        with self._lock:
            row = self._db.execute(
                "SELECT max(coalesce((SELECT revision FROM topology WHERE id = 1), 0), "
                "coalesce((SELECT max(revision) FROM mutations), 0))"
            ).fetchone()
        return int(row[0])

    # -- the journal of accepted mutations -------------------------------------

    def append_mutation(
        self,
        base_revision: int,
        action: str,
        params_json: str,
        at: str,
        chain_digest: str,
        *,
        sync: bool = True,
    ) -> int:
        """Append one accepted mutation on top of `base_revision`; returns its revision.
        Raises StoreError (and writes nothing) if the store moved past `base_revision`.

        `sync=False`: the transaction is committed and written to the WAL file (a
        process crash keeps it) without waiting for the disk; it is durable once
        `sync_journal()` returns. SQLite's synchronous=FULL in WAL mode is exactly
        "fsync the WAL after each commit", so commit + sync_journal is FULL, with the
        fsync moved to where the caller can overlap it with other work."""
        if not sync and self._wal:
            with self._lock:
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    return self.append_mutation(
                        base_revision, action, params_json, at, chain_digest
                    )
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
        with self._lock, self._transaction() as db:
            current = db.execute(
                "SELECT max(coalesce((SELECT revision FROM topology WHERE id = 1), 0), "
                "coalesce((SELECT max(revision) FROM mutations), 0))"
            ).fetchone()[0]
            if int(current) != base_revision:
                raise StoreError(
                    f"the stored revision moved from {base_revision} to {current} under the call"
                )
            new = base_revision + 1
            db.execute(
                "INSERT INTO mutations (revision, action, params, at, digest, saved_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (new, action, params_json, at, chain_digest, time.time()),
            )
        return new

    def sync_journal(self) -> None:
        """Make every committed transaction durable: fsync the WAL file (what
        synchronous=FULL does at each commit). Without WAL every commit was FULL."""
        if not self._wal:
            return
        fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def journal(self, after: int = 0) -> list[tuple[int, str, dict[str, Any], str, str]]:
        """(revision, action, params, at, digest) of the journal after `after`, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT revision, action, params, at, digest FROM mutations "
                "WHERE revision > ? ORDER BY revision",
                (after,),
            ).fetchall()
        return [(r, a, json.loads(p), at, d) for r, a, p, at, d in rows]

    def checkpoint(
        self, revision: int, topology_json: dict[str, Any], settings: dict[str, str]
    ) -> bool:
        """Store the document of `revision` (a replay of the journal up to it) and drop
        the journal up to it, in one transaction; False if the document moved meanwhile."""
        text = canonical_json(topology_json)
        doc_digest = hashlib.sha256(text.encode()).hexdigest()
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT revision FROM topology WHERE id = 1").fetchone()
            if row is not None and int(row[0]) >= revision:
                return False
            db.execute(
                "INSERT INTO topology (id, revision, document, digest, saved_at) "
                "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "revision = excluded.revision, document = excluded.document, "
                "digest = excluded.digest, saved_at = excluded.saved_at",
                (revision, text, doc_digest, time.time()),
            )
            db.execute("DELETE FROM mutations WHERE revision <= ?", (revision,))
            for key, value in settings.items():
                db.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        return True

    def save_topology(self, topology_json: dict[str, Any]) -> int:
        """Store a new topology document; returns its revision (previous + 1)."""
        text = canonical_json(topology_json)
        doc_digest = hashlib.sha256(text.encode()).hexdigest()
        with self._lock, self._transaction() as db:
            row = db.execute(
                "SELECT max(coalesce((SELECT revision FROM topology WHERE id = 1), 0), "
                "coalesce((SELECT max(revision) FROM mutations), 0))"
            ).fetchone()
            new = int(row[0]) + 1
            # The document supersedes the journal of API calls made before it.
            db.execute("DELETE FROM mutations")
            db.execute(
                "INSERT INTO topology (id, revision, document, digest, saved_at) "
                "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "revision = excluded.revision, document = excluded.document, "
                "digest = excluded.digest, saved_at = excluded.saved_at",
                (new, text, doc_digest, time.time()),
            )
        return new

    # -- what the kernel holds -----------------------------------------------

    def record_applied(self, namespace: str, revision: int, topology_digest: str) -> None:
        """`namespace` enforces the program of revision `revision` (document `topology_digest`)."""
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO applied (namespace, revision, digest, applied_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (namespace) DO UPDATE SET "
                "revision = excluded.revision, digest = excluded.digest, "
                "applied_at = excluded.applied_at",
                (namespace, revision, topology_digest, time.time()),
            )

    def applied(self, namespace: str) -> AppliedRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT namespace, revision, digest, applied_at FROM applied WHERE namespace = ?",
                (namespace,),
            ).fetchone()
        return None if row is None else AppliedRecord(*row)

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
