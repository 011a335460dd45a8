"""Per-rule hit totals, accumulated from the kernel's counters across changes and restarts.

With `rule_counters` on, each counted element of a router's table is one box
decided by one ECS rule (translators/counters.py). The kernel's counter of an
element starts at zero whenever the element is created, so a change that
recreates elements, a full rewrite or a flushed chain would make a plain
reading go backwards. The agent therefore keeps, per rule id, a total that only
grows: at each reading it adds what every counter gained since the reading
before (a counter lower than last time was recreated: all of it is new). The
sets a change is about to delete or rewrite are read just before the
change (`Reconciler`), so what they counted is not lost; the agent also reads
every router's whole table every `rule_counters_interval` seconds.

What is counted: packets that reach the rule chains, i.e. the first packet of
each new flow (and each retry of a refused one); established traffic is
accepted before the rule chains and never counted.

The totals, the time each rule was last hit and the last readings (non-zero
ones only) are kept in `rule-hits.json` under the state directory, written
atomically after each reading, so totals survive agent restarts (the kernel
keeps its counters while the agent is away, and an adopted table keeps them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from nftsg.translators.counters import DEFAULT, CounterKey, element_labels, listed_counters
from nftsg.translators.nft import Program

log = logging.getLogger(__name__)

HITS_FILE = "rule-hits.json"
_VERSION = 1


def hits_path(state_dir: Path) -> Path:
    return state_dir / HITS_FILE


class RuleHits:
    """Monotone per-rule totals (packets, bytes, last hit) fed with kernel listings."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.lock = threading.Lock()
        self.started = clock()
        # rule id -> [packets, bytes, last hit (epoch s) or None]
        self.rules: dict[str, list[Any]] = {}
        # "<namespace> <chain>" -> [packets, bytes, last hit]: each profile side's default
        self.defaults: dict[str, list[Any]] = {}
        # (namespace, set or chain, element) -> (packets, bytes) at the last reading
        self._last: dict[tuple[str, str, Any], tuple[int, int]] = {}
        self.last_reading: float | None = None
        # The labels of the program last read (held, not its id: ids are reused).
        self._labels: tuple[Program, dict[CounterKey, str]] | None = None
        self._load()

    # -- persistence -------------------------------------------------------------

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("rule hits: cannot read %s, starting over: %s", self.path, exc)
            return
        if not isinstance(doc, dict) or doc.get("version") != _VERSION:
            log.warning("rule hits: %s has an unknown format, starting over", self.path)
            return
        self.started = float(doc.get("started", self.started))
        self.rules = {str(k): list(v) for k, v in doc.get("rules", {}).items()}
        self.defaults = {str(k): list(v) for k, v in doc.get("defaults", {}).items()}
        self.last_reading = doc.get("last_reading")
        for ns, name, key, p, b in doc.get("last", []):
            self._last[(ns, name, _thaw(key))] = (int(p), int(b))

    def save(self) -> None:
        doc = {
            "version": _VERSION,
            "started": self.started,
            "last_reading": self.last_reading,
            "rules": self.rules,
            "defaults": self.defaults,
            "last": [[ns, name, key, p, b] for (ns, name, key), (p, b) in self._last.items()],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, self.path)

    # -- readings ------------------------------------------------------------------

    def _labels_of(self, program: Program) -> dict[CounterKey, str]:
        if self._labels is None or self._labels[0] is not program:
            self._labels = (program, element_labels(program))
        return self._labels[1]

    def observe(self, namespace: str, program: Program, listing: Mapping[str, Any]) -> int:
        """Add what the counters in `listing` (a table, a set or a chain of
        `namespace`, holding `program`) gained since the last reading; returns the
        packets added."""
        counters = listed_counters(listing)
        added = 0
        now = self.clock()
        with self.lock:
            labels = self._labels_of(program)
            for (name, key), (packets, octets) in counters.items():
                ck = (namespace, name, key)
                lp, lb = self._last.get(ck, (0, 0))
                dp, db = (packets, octets) if packets < lp else (packets - lp, octets - lb)
                if packets:
                    self._last[ck] = (packets, octets)
                else:
                    self._last.pop(ck, None)
                if not dp:
                    continue
                if key == DEFAULT:
                    total = self.defaults.setdefault(f"{namespace} {name}", [0, 0, None])
                else:
                    label = labels.get((name, key))
                    if label is None:
                        continue  # not one of ours (or a stale element): nothing to name
                    total = self.rules.setdefault(label, [0, 0, None])
                total[0] += dp
                total[1] += db
                total[2] = now
                added += dp
            self.last_reading = now
            # Every reading is saved (the report shows how fresh its totals are);
            # one small file per drift check, written atomically.
            self.save()
        return added

    def forget(self, namespace: str, names: Iterable[str] | None = None) -> None:
        """The counters of these sets/chains (all of `namespace` for None) are being
        recreated: their next reading starts from zero."""
        with self.lock:
            wanted = None if names is None else set(names)
            for ck in [
                k for k in self._last if k[0] == namespace and (wanted is None or k[1] in wanted)
            ]:
                del self._last[ck]

    def forget_elements(self, namespace: str, name: str, keys: Iterable[Any]) -> None:
        with self.lock:
            for key in keys:
                self._last.pop((namespace, name, key), None)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "started": self.started,
                "last_reading": self.last_reading,
                "rules": {k: list(v) for k, v in self.rules.items()},
                "defaults": {k: list(v) for k, v in self.defaults.items()},
            }


def _thaw(value: Any) -> Any:
    """JSON lists back to the tuples of an element key."""
    if isinstance(value, list):
        return tuple(_thaw(v) for v in value)
    return value


def read_hits(state_dir: Path) -> dict[str, Any] | None:
    """The persisted totals (for `nftsg report`), None when counting never ran."""
    try:
        doc = json.loads(hits_path(state_dir).read_text())
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else None
