"""Keep one profile side's first-match pieces across changes, recomputing only where
the change can matter.

A cold compile of a side runs `first_match_pieces` over all its rules (10-25 ms at
the benchmark's scale); a rule change or a member's address arriving in a
referenced group used to rerun it for every side holding the group. But the
first-match decision at a point depends only on the rules whose box holds the
point, so a change whose added and removed rule boxes lie inside a region Q can
only change the decision inside Q. Per box q of Q:

1. the kept pieces overlapping q are taken out, and their parts outside q put
   back (`_subtract`: disjoint boxes, still deciding as before);
2. the side's rules that overlap q, clipped to q, go through
   `first_match_pieces`: exactly the wanted region inside q.

The result is again a disjoint, exact cover of the wanted region, maybe cut
differently from a cold compile (pieces straddling q's boundary are split);
`refragmented` tells the caller when the count has grown enough to start over.

Finding overlaps without scanning: pieces and rules are kept in `BoxBins`
(binned like `firstmatch._Index`, with removal). Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .firstmatch import SPLIT_ORDER, _overlap, _subtract, first_match_pieces
from .flatten import Box, Ranked
from .nft import Span

T = TypeVar("T")

# Field of the bins (the destination port, as in firstmatch._Index).
_BIN_FIELD = 2
_BIN_BITS = 10
_MAX_BINS = 4
# Past this many boxes in Q (say a rule naming a prefix list of 200 entries) the
# caller recompiles the side cold: one pass over all rules beats many passes.
MAX_REGION_BOXES = 64


class BoxBins(Generic[T]):
    """Items with a box, found by overlap: grouped by field 0 (the protocol) and
    binned by the destination port; an item spanning more than `_MAX_BINS` bins is
    kept apart and always tested."""

    def __init__(self) -> None:
        self._by_proto: dict[Span, tuple[dict[int, set[T]], set[T]]] = {}

    def add(self, box: Box, item: T) -> None:
        bins, wide = self._by_proto.setdefault(box[0], ({}, set()))
        lo, hi = box[_BIN_FIELD].lo >> _BIN_BITS, box[_BIN_FIELD].hi >> _BIN_BITS
        if hi - lo >= _MAX_BINS:
            wide.add(item)
        else:
            for k in range(lo, hi + 1):
                bins.setdefault(k, set()).add(item)

    def remove(self, box: Box, item: T) -> None:
        bins, wide = self._by_proto[box[0]]
        lo, hi = box[_BIN_FIELD].lo >> _BIN_BITS, box[_BIN_FIELD].hi >> _BIN_BITS
        if hi - lo >= _MAX_BINS:
            wide.remove(item)
        else:
            for k in range(lo, hi + 1):
                bins[k].remove(item)

    def candidates(self, box: Box) -> Iterator[T]:
        """A superset of the items overlapping `box` (an item may come twice)."""
        proto, port = box[0], box[_BIN_FIELD]
        lo, hi = port.lo >> _BIN_BITS, port.hi >> _BIN_BITS
        for p, (bins, wide) in self._by_proto.items():
            if p.hi < proto.lo or proto.hi < p.lo:
                continue
            yield from wide
            if hi - lo >= _MAX_BINS:
                for members in bins.values():
                    yield from members
            else:
                for k in range(lo, hi + 1):
                    got = bins.get(k)
                    if got:
                        yield from got


# A rule of a group as the side sees it: (box, rank, policy).
RuleItem = tuple[Box, tuple[int, int], str]


def rule_bins(items: Iterable[RuleItem]) -> BoxBins[RuleItem]:
    bins: BoxBins[RuleItem] = BoxBins()
    for item in items:
        bins.add(item[0], item)
    return bins


def _clip(a: Box, b: Box) -> Box:
    return tuple(Span(max(x.lo, y.lo), min(x.hi, y.hi)) for x, y in zip(a, b, strict=True))


@dataclass
class KeptPieces:
    """One side's pieces: sorted (the set's element order) and binned."""

    elements: list[Box]
    cold_size: int  # pieces right after the last cold compile
    _bins: BoxBins[Box] | None = field(default=None, repr=False)

    def bins(self) -> BoxBins[Box]:
        # Built on the first update only: most sides are never updated in place.
        if self._bins is None:
            self._bins = BoxBins()
            for box in self.elements:
                self._bins.add(box, box)
        return self._bins

    def refragmented(self) -> bool:
        """Grown well past a cold compile's count: the caller should start over."""
        return len(self.elements) > 2 * self.cold_size + 256

    def _take(self, box: Box) -> None:
        i = bisect_left(self.elements, box)
        assert self.elements[i] == box
        del self.elements[i]
        self.bins().remove(box, box)

    def _put(self, box: Box) -> None:
        insort(self.elements, box)
        self.bins().add(box, box)

    def recompute(
        self,
        q: Box,
        rules: Sequence[Ranked],
        split_order: Sequence[int] = SPLIT_ORDER,
    ) -> bool:
        """Make the pieces inside q exactly `rules`' (already clipped to q) first-match
        pieces; the pieces outside q stay as they are. False (and nothing touched)
        when the region inside q did not change: a member's address already decided
        by a wider rule, say, must not split that rule's piece for nothing."""
        bins = self.bins()
        hit = sorted({b for b in bins.candidates(q) if _overlap(b, q)})
        got = first_match_pieces(rules, 1 << 62, split_order)
        assert got is not None
        inside = [box for box, _ in got]
        if _same_region([_clip(p, q) for p in hit], inside):
            return False
        for piece in hit:
            self._take(piece)
            outside: list[Box] = []
            _subtract(piece, q, outside, split_order)
            for box in outside:
                self._put(box)
        for box in inside:
            self._put(box)
        return True


def _volume(box: Box) -> int:
    v = 1
    for s in box:
        v *= s.hi - s.lo + 1
    return v


# Beyond this many pairs the exact test is skipped (the pieces are then replaced).
_MAX_PAIRS = 4096


def _same_region(a: list[Box], b: list[Box]) -> bool:
    """Whether two sets of pairwise disjoint boxes cover the same points: equal
    lists, or equal volumes with the pairwise intersections summing to that volume."""
    a_sorted = sorted(a)
    if a_sorted == b:
        return True
    if len(a) * len(b) > _MAX_PAIRS:
        return False
    va = sum(_volume(x) for x in a)
    if va != sum(_volume(x) for x in b):
        return False
    shared = sum(_volume(_clip(x, y)) for x in a for y in b if _overlap(x, y))
    return shared == va


def region_of_change(
    old: Sequence[Mapping[object, frozenset[Box]]],
    new: Sequence[Mapping[object, frozenset[Box]]],
    family_of: Mapping[object, str] | None = None,
    family: str | None = None,
) -> list[Box]:
    """The boxes whose bucket membership differs between `old` and `new` (per group,
    bucket -> boxes), restricted to the buckets of `family`; sorted, no duplicates.
    Outside their union no rule appeared, vanished or changed rank."""
    q: set[Box] = set()
    empty: frozenset[Box] = frozenset()
    for a, b in zip(old, new, strict=True):
        if a is b:
            continue
        for bkey in a.keys() | b.keys():
            if family is not None and getattr(bkey, "family", None) != family:
                continue
            sa, sb = a.get(bkey, empty), b.get(bkey, empty)
            if sa is sb or sa == sb:
                continue
            q.update(sa ^ sb)
    return sorted(q)


def overlapping_rules(q: Box, bins: BoxBins[RuleItem]) -> list[RuleItem]:
    """The rules of one group (its bins) whose box overlaps q."""
    return [item for item in set(bins.candidates(q)) if _overlap(item[0], q)]


def clipped_rules(q: Box, per_group: Iterable[list[RuleItem]], want: str) -> list[Ranked]:
    """The rules overlapping q (per group, from `overlapping_rules`), clipped to q and
    ranked for the side; a rule held by two groups once."""
    seen: set[tuple[Box, tuple[int, int]]] = set()
    out: list[Ranked] = []
    for items in per_group:
        for box, rank, policy in items:
            if (box, rank) in seen:
                continue
            seen.add((box, rank))
            out.append(Ranked(_clip(box, q), rank, policy == want))
    return out
