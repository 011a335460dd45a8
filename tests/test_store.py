"""The state store keeps the topology, revisions, applied digests and settings,
and a crash at any moment leaves a complete old or new state."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nftsg.agent.store import ENV_VAR, Store, StoreError, digest
from nftsg.translators.model import topology_from_data

TOPOLOGY = {
    "vpcs": [
        {
            "vpc_id": "vpc-lab",
            "cidr_block": "10.0.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-a", "cidr_block": "10.0.1.0/24"}],
        }
    ],
    "security_groups": [
        {
            "security_group_id": "sg-web",
            "vpc_id": "vpc-lab",
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "80/80",
                    "source_cidr_ip": "0.0.0.0/0",
                }
            ],
        }
    ],
    "instances": [
        {
            "instance_id": "i-web1",
            "vswitch_id": "vsw-a",
            "private_ip_address": "10.0.1.10",
            "security_group_ids": ["sg-web"],
        }
    ],
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_empty_store(store: Store) -> None:
    assert store.load() is None
    assert store.revision() == 0
    assert store.applied("vpc-lab") is None


def test_topology_round_trip_and_revisions(store: Store, tmp_path: Path) -> None:
    doc = topology_from_data(TOPOLOGY).model_dump(mode="json", exclude_defaults=True)
    assert store.save_topology(doc) == 1
    changed = json.loads(json.dumps(doc))
    changed["instances"][0]["private_ip_address"] = "10.0.1.20"
    assert store.save_topology(changed) == 2
    store.close()

    reopened = Store(tmp_path / "state.db")
    state = reopened.load()
    assert state is not None
    assert state.revision == 2
    assert state.topology == changed
    assert topology_from_data(state.topology) == topology_from_data(changed)
    assert state.digest == digest(changed)
    reopened.close()


def test_digest_ignores_key_order() -> None:
    a = {"b": 1, "a": [1, {"y": 2, "x": 3}]}
    b = {"a": [1, {"x": 3, "y": 2}], "b": 1}
    assert digest(a) == digest(b)
    assert digest(a) != digest({**a, "b": 2})


def test_applied_records(store: Store) -> None:
    rev = store.save_topology(TOPOLOGY)
    doc_digest = digest(TOPOLOGY)
    store.record_applied("nt-vpc-lab", rev, doc_digest)
    record = store.applied("nt-vpc-lab")
    assert record is not None
    assert (record.revision, record.digest) == (rev, doc_digest)
    state = store.load()
    assert state is not None and set(state.applied) == {"nt-vpc-lab"}


def test_settings(store: Store) -> None:
    assert store.get_setting("prefix") is None
    assert store.get_setting("prefix", "nt") == "nt"
    store.set_setting("prefix", "lab1")
    store.set_setting("prefix", "lab2")
    assert store.get_setting("prefix") == "lab2"


def test_durability_settings_and_private_file(store: Store) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert os.stat(store.path).st_mode & 0o077 == 0


def test_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "env.db"
    monkeypatch.setenv(ENV_VAR, str(path))
    with Store() as s:
        s.save_topology({"vpcs": []})
    assert path.exists()


# A writer that saves ever larger topologies (so a kill often lands inside a
# write), each followed by its applied record, until it is killed.
_WRITER = r"""
import sys
from nftsg.agent.store import Store, digest
store = Store(sys.argv[1])
rev = store.revision()
print("ready", flush=True)
while True:
    seq = rev
    doc = {"seq": seq, "instances": [{"instance_id": f"i-{seq}-{k}", "pad": "x" * 200}
                                     for k in range(200 + seq % 300)]}
    rev = store.save_topology(doc)
    store.record_applied("nt-vpc", rev, digest({"program": seq}))
"""


def test_sigkill_at_random_points_leaves_old_or_new_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    rng = random.Random(7)
    last_revision = 0
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.005, 0.12))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        with Store(path) as s:
            state = s.load()  # raises if the document does not match its digest
        assert state is not None
        # Topology and revision were written together: seq n has revision n+1.
        assert state.topology["seq"] == state.revision - 1
        assert len(state.topology["instances"]) == 200 + (state.revision - 1) % 300
        assert state.revision >= last_revision  # never goes back
        applied = state.applied.get("nt-vpc")
        if applied is not None:
            # Recorded after the save, never ahead of it (a kill between a save
            # and its record, in two runs in a row, leaves it two behind).
            assert applied.revision <= state.revision
            assert applied.digest == digest({"program": applied.revision - 1})
        last_revision = state.revision
    assert last_revision > 12  # the writers did make progress


def test_deferred_append_commits_now_and_syncs_the_wal(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    base = store.revision()
    rev = store.append_mutation(base, "A", "{}", "t", "d1", sync=False)
    assert rev == base + 1
    # Committed: another connection reads it before any fsync was asked for.
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT action FROM mutations WHERE revision = ?", (rev,)).fetchone()
    other.close()
    # The connection is back to FULL for every other write.
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    store.sync_journal()
    assert synced == [f"{store.path.resolve()}-wal"]
    # A conflicting deferred append writes nothing, as the synchronous one.
    with pytest.raises(StoreError):
        store.append_mutation(base, "B", "{}", "t", "d2", sync=False)
    assert [r[0] for r in store.journal(base)] == [rev]


_JOURNAL_WRITER = r"""
import sys
from nftsg.agent.store import Store
store = Store(sys.argv[1])
rev = store.revision()
print("ready", flush=True)
while True:
    rev = store.append_mutation(rev, "A", '{"pad": "%s"}' % ("x" * (rev % 900)), "t", str(rev),
                                sync=False)
"""


def test_sigkill_during_deferred_appends_keeps_a_whole_journal(tmp_path: Path) -> None:
    """Killed between a commit and its fsync (or inside a commit): every committed
    entry survives a process crash, the journal has no gap and no torn row."""
    path = tmp_path / "journal.db"
    rng = random.Random(3)
    last = 0
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _JOURNAL_WRITER, str(path)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.005, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with Store(path) as s:
            journal = s.journal()
        revisions = [r for r, *_ in journal]
        assert revisions == list(range(1, len(revisions) + 1))
        assert all(p == {"pad": "x" * ((r - 1) % 900)} for r, _, p, _, _ in journal)
        assert len(revisions) >= last
        last = len(revisions)
    assert last > 8
