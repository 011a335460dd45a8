"""The wanted region of prioritised rules as first-match pieces: each rule's box minus
the boxes of the rules before it.

`flatten`'s reduced decision diagram is canonical, but canonical is costly here:
it splits the space on each field at every rule boundary, so the port ranges of
an `0.0.0.0/0` rule are repeated in every peer piece cut by the narrower peers
of other rules (the benchmark model: 165k boxes for 40k rules). The kernel needs
disjoint elements, not canonical ones. In decision order (rank, then box, so the
result does not depend on the input order), rule i holds exactly the points
   piece_i = box_i minus the union of box_j for j before i
that it decides; the pieces are pairwise disjoint, and the region where the
wanted verdict decides is the union of the wanted rules' pieces. A rule that
overlaps no earlier rule is one box, whatever the other fields of the others;
only real overlaps cut. Each piece also names its deciding rule.

Boxes are subtracted field by field in `SPLIT_ORDER` (ports before addresses:
a port remainder is a few prefix blocks, an address remainder such as
`0.0.0.0/0` minus a /16 is up to 2 x 16, and splitting addresses last keeps
those remainders narrow on the other fields).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from .flatten import Box, Ranked
from .nft import Span

# proto, dport, sport, local, peer (the key is proto . peer . dport . sport . local)
SPLIT_ORDER = (0, 2, 3, 4, 1)


def _overlap(a: Box, b: Box) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.hi < y.lo or y.hi < x.lo:
            return False
    return True


def _subtract(a: Box, b: Box, out: list[Box], split_order: Sequence[int]) -> None:
    """Append the disjoint boxes of a minus b (b overlaps a) to out."""
    cur = list(a)
    for f in split_order:
        s, t = cur[f], b[f]
        if s.lo < t.lo:
            cur[f] = Span(s.lo, t.lo - 1)
            out.append(tuple(cur))
        if t.hi < s.hi:
            cur[f] = Span(t.hi + 1, s.hi)
            out.append(tuple(cur))
        cur[f] = Span(max(s.lo, t.lo), min(s.hi, t.hi))


def first_match_pieces(
    rules: Sequence[Ranked], limit: int, split_order: Sequence[int] = SPLIT_ORDER
) -> list[tuple[Box, int]] | None:
    """(piece, index of its deciding rule in `rules`) for every wanted rule's piece,
    sorted by piece; None beyond `limit` pieces (the caller then flattens).
    Field 0 is the protocol (any field works; it only groups the earlier boxes)."""
    order = sorted(range(len(rules)), key=lambda i: (rules[i].rank, rules[i].box))
    out: list[tuple[Box, int]] = []
    index = _Index()
    for seq, i in enumerate(order):
        r = rules[i]
        if r.wanted:
            frags = [r.box]
            for b in index.overlapping(r.box):
                nxt: list[Box] = []
                for fr in frags:
                    if _overlap(fr, b):
                        _subtract(fr, b, nxt, split_order)
                    else:
                        nxt.append(fr)
                frags = nxt
                if not frags:
                    break
            out.extend((fr, i) for fr in frags)
            if len(out) > limit:
                return None
        index.add(seq, r.box)
    out.sort()
    return out


_Entry = tuple[int, Box]  # (position in decision order, box)


class _Index:
    """The earlier boxes, found by overlap without testing every pair (the compile
    spent most of its time in pairwise tests): grouped by field 0 (the protocol)
    and binned by field 2 (the destination port) in bins of 2^`_BIN_BITS`; a box
    spanning more than `_MAX_BINS` bins is kept apart and always tested."""

    _BIN_BITS = 10
    _MAX_BINS = 4

    def __init__(self) -> None:
        # protocol span -> (port bin -> [(seq, box)], [(seq, box) too wide to bin])
        self._by_proto: dict[Span, tuple[dict[int, list[_Entry]], list[_Entry]]] = {}

    def add(self, seq: int, box: Box) -> None:
        bins, wide = self._by_proto.setdefault(box[0], ({}, []))
        lo, hi = box[2].lo >> self._BIN_BITS, box[2].hi >> self._BIN_BITS
        if hi - lo >= self._MAX_BINS:
            wide.append((seq, box))
        else:
            for k in range(lo, hi + 1):
                bins.setdefault(k, []).append((seq, box))

    def overlapping(self, box: Box) -> list[Box]:
        """The earlier boxes that overlap `box`, in the order they were added."""
        proto, dport = box[0], box[2]
        lo, hi = dport.lo >> self._BIN_BITS, dport.hi >> self._BIN_BITS
        found: dict[int, Box] = {}
        for p, (bins, wide) in self._by_proto.items():
            if p.hi < proto.lo or proto.hi < p.lo:
                continue
            for seq, b in wide:
                if _overlap(box, b):
                    found[seq] = b
            if hi - lo >= self._MAX_BINS:
                candidates = [x for k in bins for x in bins[k]]
            else:
                candidates = [x for k in range(lo, hi + 1) for x in bins.get(k, ())]
            for seq, b in candidates:
                if seq not in found and _overlap(box, b):
                    found[seq] = b
        return [found[k] for k in sorted(found)]


def first_match_region(
    rules: Sequence[Ranked], limit: int, split_order: Sequence[int] = SPLIT_ORDER
) -> list[Box] | None:
    """The disjoint boxes where a wanted rule decides, sorted; None beyond `limit`."""
    pieces = first_match_pieces(rules, limit, split_order)
    return None if pieces is None else [b for b, _ in pieces]
