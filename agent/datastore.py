"""The control plane's durable state: a document plus a journal of accepted mutations.

The seam (`Datastore`) is what the control plane (agent/control.py) needs of a
store, nothing more: the current revision, the last document with the journal
after it, appending one mutation on top of a known revision (atomic, and
refused if the store moved: compare-and-set, as etcd's transactions do), and a
checkpoint that folds the journal into a new document. `SqliteDatastore` is the
one implementation, over agent/store.py; another store (etcd, for many hosts)
implements the same five methods.

A mutation is stored as the ECS call (action, parameters, the time it was
accepted): `translators.actions.Model.perform` is deterministic given the
model, including its id counter, so replaying the journal on the document
rebuilds the very model that accepted the calls. The counter is kept with each
checkpoint for that reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from nftsg.translators.actions import Model
from nftsg.translators.model import topology_from_data

from .store import Store, StoreError, canonical_json

_COUNTER_KEY = "model_counter"


@dataclass(frozen=True)
class Mutation:
    revision: int
    action: str
    params: dict[str, Any]
    at: str  # the `now` it was performed with
    digest: str  # chained: sha256(previous digest + the mutation)


@dataclass(frozen=True)
class Snapshot:
    revision: int  # of the document; the journal continues from there
    topology: dict[str, Any]
    digest: str
    counter: int  # the model's id counter at that revision
    journal: tuple[Mutation, ...]

    @property
    def head(self) -> int:
        return self.journal[-1].revision if self.journal else self.revision

    @property
    def head_digest(self) -> str:
        return self.journal[-1].digest if self.journal else self.digest


class Conflict(Exception):
    """The store moved past the revision a mutation was performed on."""


class Datastore(Protocol):
    def revision(self) -> int: ...

    def load(self) -> Snapshot | None: ...

    def append(self, base_revision: int, action: str, params: dict[str, Any], at: str) -> Mutation:
        """Durably store one mutation on top of `base_revision` (raises Conflict if the
        store is elsewhere); returns it with its revision and digest."""
        ...

    def checkpoint(self, revision: int, model: Model) -> bool: ...

    def head_digest(self) -> str: ...


def chain_digest(previous: str, action: str, params: dict[str, Any], at: str) -> str:
    text = canonical_json({"previous": previous, "action": action, "params": params, "at": at})
    return hashlib.sha256(text.encode()).hexdigest()


class SqliteDatastore:
    """`Datastore` over the agent's SQLite store (one transaction per call)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._head: tuple[int, str] | None = None  # (revision, digest) of our last write
        self._syncer: ThreadPoolExecutor | None = None  # runs the deferred fsyncs

    def revision(self) -> int:
        return self.store.revision()

    def load(self) -> Snapshot | None:
        state = self.store.load()
        if state is None:
            return None
        counter = 0
        raw = self.store.get_setting(_COUNTER_KEY)
        if raw:
            at_revision, _, value = raw.partition(":")
            if at_revision == str(state.revision):
                counter = int(value)
        journal = tuple(
            Mutation(rev, action, params, at, dg)
            for rev, action, params, at, dg in self.store.journal(state.revision)
        )
        snapshot = Snapshot(state.revision, state.topology, state.digest, counter, journal)
        self._head = (snapshot.head, snapshot.head_digest)
        return snapshot

    def head_digest(self) -> str:
        return self._head[1] if self._head else ""

    def append(self, base_revision: int, action: str, params: dict[str, Any], at: str) -> Mutation:
        return self._append(base_revision, action, params, at, sync=True)

    def append_deferred(
        self, base_revision: int, action: str, params: dict[str, Any], at: str
    ) -> tuple[Mutation, Callable[[], None]]:
        """`append`, durable once the returned function returns (it raises OSError if
        the disk failed). The transaction is committed at once (a process crash keeps
        it); its fsync runs in a helper thread meanwhile, so the caller overlaps it with
        the kernel commit and waits before answering (docs/dataplane.md
        §"Per-change cost: kernel side")."""
        mutation = self._append(base_revision, action, params, at, sync=False)
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="store-sync")
        done = self._syncer.submit(self.store.sync_journal)
        return mutation, done.result

    def _append(
        self, base_revision: int, action: str, params: dict[str, Any], at: str, *, sync: bool
    ) -> Mutation:
        previous = self._head[1] if self._head and self._head[0] == base_revision else ""
        if not previous:
            snapshot = self.load()
            previous = snapshot.head_digest if snapshot else ""
        dg = chain_digest(previous, action, params, at)
        try:
            revision = self.store.append_mutation(
                base_revision, action, json.dumps(params, sort_keys=True), at, dg, sync=sync
            )
        except StoreError as exc:
            raise Conflict(str(exc)) from exc
        self._head = (revision, dg)
        return Mutation(revision, action, params, at, dg)

    def checkpoint(self, revision: int, model: Model) -> bool:
        return self.store.checkpoint(
            revision,
            model.topology.model_dump(mode="json"),
            {_COUNTER_KEY: f"{revision}:{model.counter}"},
        )


def replay(snapshot: Snapshot, quotas: Any = None, *, consume: bool = False) -> Model:
    """The model of `snapshot.head`: the document loaded, then every journal entry performed.

    With `consume`, the snapshot's document (plain JSON data, as big as the typed
    model at scale) is emptied once it is parsed, so it is not held while the model
    is validated and indexed: 19 MB less peak on the benchmark model at 200 ENIs
    (docs/design.md §Memory). The caller must not read `snapshot.topology` after."""
    from dataclasses import replace

    topology = topology_from_data(snapshot.topology)
    if consume:
        snapshot.topology.clear()
    model = Model.load(topology) if quotas is None else Model.load(topology, quotas)
    model = replace(model, counter=snapshot.counter)
    for mutation in snapshot.journal:
        model, _ = model.perform(mutation.action, mutation.params, now=mutation.at)
    return model
