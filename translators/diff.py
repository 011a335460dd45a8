"""(old program, new program) -> the commands of one transaction that touches only what changed.

Why this shape (docs/kernel-notes.md §"Cost of a change"): element updates cost
~4 ms whatever the set size, while anything that adds rules to chains
reachable from a verdict map makes the kernel re-validate every reachable
jump. So membership and prefix list changes must stay element deltas, and
only chains whose rule list changed are flushed and rewritten whole.

Order inside the batch, so that every reference is valid when the kernel
checks it (nftables checks within the transaction, in command order):
1. add new chains (empty) and new sets/maps with their elements;
2. flush chains whose rules changed or that go away (drops their references
   to sets and chains);
3. element deletes, then element adds, for sets/maps kept (deletes first: an
   element may move between the parts of a bucket, and parts must never hold
   overlapping elements, even transiently);
4. rules of the flushed chains that stay;
5. delete removed maps, then removed chains (nothing jumps to them any more),
   then removed sets (no rule looks them up any more).
If the table itself or the definition of a kept object (type, flags, hook)
changed, nothing can be patched in place: the answer is a full sync, which is
one atomic transaction too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from .nft import Command, Key, NftChain, NftMap, NftSet, Program, Verdict, Writer


def diff_programs(old: Program | None, new: Program) -> list[Command]:
    """Commands of one transaction turning the kernel's `old` table into `new`.

    `old` None (nothing known about the kernel) gives a full sync. Identical
    programs give no command at all.
    """
    if old is None or not _patchable(old, new):
        return new.full_sync_commands()
    w = Writer(new.family, new.table)
    head: list[Command] = []
    flushes: list[Command] = []
    element_deletes: list[Command] = []
    element_adds: list[Command] = []
    rules: list[Command] = []
    tail: list[Command] = []

    for chain in new.chains:
        if chain.name not in old.chain_by_name:
            head.append(w.add_chain(chain))
    for s in new.sets:
        if s.name not in old.set_by_name:
            head.append(w.add_set(s))
    for m in new.maps:
        if m.name not in old.map_by_name:
            head.append(w.add_map(m))

    for chain in new.chains:
        was = old.chain_by_name.get(chain.name)
        if was is chain:  # carried over by the incremental compile: nothing to compare
            continue
        if was is None or was.rules != chain.rules:
            if was is not None and was.rules:
                flushes.append(w.flush_chain(chain.name))
            rules.extend(w.add_rule(chain.name, r) for r in chain.rules)
    for chain in old.chains:
        if chain.name not in new.chain_by_name:
            if chain.rules:
                flushes.append(w.flush_chain(chain.name))
            tail.append(w.delete_chain(chain.name))

    for s in new.sets:
        was_set = old.set_by_name.get(s.name)
        if was_set is not s and was_set is not None and was_set.elements != s.elements:
            gone, added = _delta(was_set.elements, s.elements)
            if gone:
                element_deletes.append(w.delete_elements(s.name, w.set_elements(s.type, gone)))
            if added:
                element_adds.append(w.add_elements(s.name, w.set_elements(s.type, added)))
    for m in new.maps:
        was_map = old.map_by_name.get(m.name)
        if was_map is not m and was_map is not None and was_map.elements != m.elements:
            gone_items, added_items = _delta(was_map.elements, m.elements)
            # A key whose verdict changed is deleted and re-added: maps cannot
            # update an element's data in place.
            gone_keys = [k for k, _ in gone_items]
            if gone_keys:
                element_deletes.append(w.delete_elements(m.name, w.set_elements(m.type, gone_keys)))
            if added_items:
                element_adds.append(w.add_elements(m.name, w.map_elements(m.type, added_items)))

    removed_maps = [m.name for m in old.maps if m.name not in new.map_by_name]
    removed_sets = [s.name for s in old.sets if s.name not in new.set_by_name]
    tail = [w.delete_map(n) for n in removed_maps] + tail + [w.delete_set(n) for n in removed_sets]
    return head + flushes + element_deletes + element_adds + rules + tail


_Elem = TypeVar("_Elem", Key, tuple[Key, Verdict])


def _delta(old: Iterable[_Elem], new: Iterable[_Elem]) -> tuple[list[_Elem], list[_Elem]]:
    """(elements only in old, elements only in new), each in sorted order.

    Map items sort by key first; a key appears once per program, so the
    verdicts are never compared.
    """
    old_set, new_set = set(old), set(new)
    return sorted(old_set - new_set, key=_sort_key), sorted(new_set - old_set, key=_sort_key)


def _sort_key(e: Key | tuple[Key, Verdict]) -> Key:
    if len(e) == 2 and isinstance(e[1], Verdict):
        first = e[0]
        assert isinstance(first, tuple)
        return first
    return e


def _patchable(old: Program, new: Program) -> bool:
    """Whether every object kept by name has the same definition in both programs."""
    if (old.family, old.table) != (new.family, new.table):
        return False
    for s in new.sets:
        was: NftSet | None = old.set_by_name.get(s.name)
        if was is s:
            continue
        if was is not None and was.definition() != s.definition():
            return False
        if s.name in old.map_by_name:
            return False
    for m in new.maps:
        was_map: NftMap | None = old.map_by_name.get(m.name)
        if was_map is m:
            continue
        if was_map is not None and was_map.definition() != m.definition():
            return False
        if m.name in old.set_by_name:
            return False
    for c in new.chains:
        was_chain: NftChain | None = old.chain_by_name.get(c.name)
        if was_chain is not None and was_chain.base != c.base:
            return False
    return True
