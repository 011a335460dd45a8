"""Exact flattening of prioritised rules into disjoint boxes of one verdict.

A side of the ECS decision (one ENI's ingress or egress, one family) is: among
the rules whose box holds the packet, the one of smallest (priority, drop
first) decides; no rule: the default. Its lookups in nftables must not grow
with the rules, priorities or groups, so the compiler writes the region where
the decision differs from the default as ONE set of pairwise disjoint
5-field boxes (a concatenated-interval set needs disjoint elements anyway)
and looks the packet up once: found -> the non-default verdict, else the
default.

The region is computed as a reduced decision diagram (a firewall decision
diagram in the sense of Gouda and Liu): split the space on one field at every
rule boundary, recurse on the rules active in each piece, share equal
sub-diagrams (hash-consing) and merge adjacent pieces with the same
sub-diagram. Each root-to-"yes" path is one box. Pruning keeps it small:
rules behind the first rule (in decision order) that covers the rest of the
space are dropped, and a piece in which no remaining rule has the wanted
verdict is empty at once. The worst case still blows up (boxes ~ product of
the fields' pieces), so `flatten` takes a limit and returns None beyond it;
the compiler then falls back to per-priority bucket sets for that side.

Pure: no I/O; boxes are tuples of `Span`s (inclusive int intervals).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .nft import Span

Box = tuple[Span, ...]

_NO = 0  # the empty diagram
_YES = 1  # the whole remaining space


class Ranked(NamedTuple):
    """A rule's box and its place in the decision order (smaller decides first)."""

    box: Box
    rank: tuple[int, int]  # (priority, 0 for drop / 1 for accept): drop wins ties
    wanted: bool  # its verdict is the one the flattened set stands for


def _covers(outer: Span, inner: Span) -> bool:
    return outer.lo <= inner.lo and inner.hi <= outer.hi


class _Diagram:
    def __init__(
        self,
        rules: Sequence[Ranked],
        domain: Box,
        order: Sequence[int],
        labelled: bool = False,
    ) -> None:
        # Stable on the input order, so the deciding rule among equal ranks is the
        # first given (labelled callers sort their input to make that deterministic).
        self.perm = sorted(range(len(rules)), key=lambda i: rules[i].rank)
        self.rules = [rules[i] for i in self.perm]
        # Labelled: a wanted rule's leaf is its own (-1 - index) instead of the one
        # _YES, so pieces decided by different rules never merge (hit counters).
        self.labelled = labelled
        self.domain = domain
        self.order = tuple(order)
        # node id -> ((lo, hi, child id), ...) on field order[depth]; 0 and 1 are leaves
        self.nodes: list[tuple[tuple[int, int, int], ...]] = [(), ()]
        self._intern: dict[tuple[tuple[int, int, int], ...], int] = {}
        self._memo: dict[tuple[int, tuple[int, ...]], int] = {}
        self._wanted = [r.wanted for r in self.rules]
        # Whether rule i covers the domain on the fields from depth d on.
        n_fields = len(self.order)
        self._full_from: list[list[bool]] = []
        for r in self.rules:
            flags = [False] * (n_fields + 1)
            flags[n_fields] = True
            for d in range(n_fields - 1, -1, -1):
                f = self.order[d]
                flags[d] = flags[d + 1] and _covers(r.box[f], domain[f])
            self._full_from.append(flags)
        self.root = self._build(0, tuple(range(len(self.rules))))

    def _build(self, depth: int, active: tuple[int, ...]) -> int:
        memo_key = (depth, active)
        got = self._memo.get(memo_key)
        if got is not None:
            return got
        out = self._memo[memo_key] = self._node(depth, active)
        return out

    def _node(self, depth: int, active: tuple[int, ...]) -> int:
        # Rules after the first one covering the rest of the space never decide.
        wanted = self._wanted
        any_wanted = False
        for k, i in enumerate(active):
            any_wanted = any_wanted or wanted[i]
            if self._full_from[i][depth]:
                if k == 0:
                    return self._leaf(i) if wanted[i] else _NO
                active = active[: k + 1]
                break
        if not any_wanted:
            return _NO
        f = self.order[depth]
        dlo, dhi = self.domain[f]
        # Sweep the field: pieces between consecutive boundaries, with their active rules.
        starts: dict[int, list[int]] = {}
        ends: dict[int, list[int]] = {}
        for i in active:
            lo, hi = self.rules[i].box[f]
            lo, hi = max(lo, dlo), min(hi, dhi)
            starts.setdefault(lo, []).append(i)
            ends.setdefault(hi + 1, []).append(i)
        points = sorted({dlo, *starts, *ends} - {dhi + 1})
        live: set[int] = set()
        pieces: list[tuple[int, int, int]] = []
        for n, p in enumerate(points):
            live.difference_update(ends.get(p, ()))
            live.update(starts.get(p, ()))
            hi = points[n + 1] - 1 if n + 1 < len(points) else dhi
            child = self._build(depth + 1, tuple(sorted(live))) if live else _NO
            if pieces and pieces[-1][2] == child:
                pieces[-1] = (pieces[-1][0], hi, child)
            else:
                pieces.append((p, hi, child))
        node = tuple(piece for piece in pieces if piece[2] != _NO)
        if not node:
            return _NO
        if len(node) == 1 and node[0][:2] == (dlo, dhi) and _is_leaf(node[0][2]):
            return node[0][2]
        out = self._intern.get(node, -1)
        if out < 0:
            out = self._intern[node] = len(self.nodes)
            self.nodes.append(node)
        return out

    def _leaf(self, i: int) -> int:
        return -1 - i if self.labelled else _YES

    def cost(self) -> tuple[int, int]:
        """(boxes, prefix blocks): root-to-yes paths, and the CIDR-style blocks their
        intervals expand to. The kernel's concatenated-interval set stores every
        field of an element as such blocks, and both its insert and its lookup
        cost grow with them (a v6 range can be ~200 blocks), so orders are
        compared on blocks."""
        paths = [0, 1] + [0] * (len(self.nodes) - 2)
        blocks = [0, 0] + [0] * (len(self.nodes) - 2)
        for n in range(2, len(self.nodes)):  # children are interned before parents
            p = b = 0
            for lo, hi, c in self.nodes[n]:
                cp, cb = (1, 0) if c < 0 else (paths[c], blocks[c])
                p += cp
                b += cb + cp * _blocks(lo, hi)
            paths[n], blocks[n] = p, b
        if self.root < 0:
            return 1, 0
        return paths[self.root], blocks[self.root]

    def boxes(self) -> list[Box]:
        return [box for box, _ in self.labelled_boxes()]

    def labelled_boxes(self) -> list[tuple[Box, int]]:
        """Boxes with the input index of their deciding rule (-1 when not labelled)."""
        out: list[tuple[Box, int]] = []
        cell: list[Span] = list(self.domain)

        def walk(node: int, depth: int) -> None:
            if node == _YES or node < 0:
                out.append((tuple(cell), self.perm[-1 - node] if node < 0 else -1))
                return
            f = self.order[depth]
            for lo, hi, child in self.nodes[node]:
                cell[f] = Span(lo, hi)
                walk(child, depth + 1)
            cell[f] = self.domain[f]

        if self.root != _NO:
            walk(self.root, 0)
        return sorted(out)


def flatten(
    rules: Sequence[Ranked], domain: Box, orders: Sequence[Sequence[int]], limit: int
) -> list[Box] | None:
    got = _best(rules, domain, orders, limit, labelled=False)
    return None if got is None else got.boxes()


def flatten_labelled(
    rules: Sequence[Ranked], domain: Box, orders: Sequence[Sequence[int]], limit: int
) -> list[tuple[Box, int]] | None:
    """As `flatten`, but each box comes with the index (in `rules`) of the rule that
    decides it, and only pieces with the same deciding rule are merged; among rules
    of equal rank holding the same point, the first in `rules` decides. For per-rule
    hit counters: more boxes than `flatten` where adjacent rules share a verdict."""
    got = _best(rules, domain, orders, limit, labelled=True)
    return None if got is None else got.labelled_boxes()


def _best(
    rules: Sequence[Ranked],
    domain: Box,
    orders: Sequence[Sequence[int]],
    limit: int,
    *,
    labelled: bool,
) -> _Diagram | None:
    """The disjoint boxes where the deciding rule is a wanted one, sorted; None if
    every field order in `orders` needs more than `limit` boxes.

    Orders are tried in turn and the first with the fewest prefix blocks wins
    (see `_Diagram.cost`), so the result is deterministic for given rules (their
    input order does not matter).
    """
    best: _Diagram | None = None
    best_cost = (limit + 1, 0)
    if not any(r.wanted for r in rules):
        return _Diagram([], domain, orders[0] if orders else (), labelled)
    for order in orders:
        d = _Diagram(rules, domain, order, labelled)
        boxes, blocks = d.cost()
        if boxes <= limit and (best is None or blocks < best_cost[1]):
            best, best_cost = d, (boxes, blocks)
        if best is not None and best_cost[1] == best_cost[0] * len(domain):
            break  # every field of every box is one block: no order does better
    return best


def _is_leaf(node: int) -> bool:
    return node == _YES or node < 0


def _blocks(lo: int, hi: int) -> int:
    """How many aligned power-of-two blocks exactly cover [lo, hi]."""
    n = 0
    while lo <= hi:
        size = lo & -lo if lo else 1 << (hi + 1).bit_length()
        while size > hi - lo + 1:
            size >>= 1
        lo += size
        n += 1
    return n


def decide(rules: Sequence[Ranked], point: Sequence[int]) -> bool | None:
    """The reference: the deciding rule's `wanted` at `point`, None if no rule holds it."""
    holding = [
        r for r in rules if all(s.lo <= v <= s.hi for s, v in zip(r.box, point, strict=True))
    ]
    if not holding:
        return None
    return min(holding, key=lambda r: r.rank).wanted
