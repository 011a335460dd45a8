"""First-match pieces of prioritised boxes (translators/firstmatch.py): the flat sets'
elements. Checked point by point against the reference `decide` and against the
canonical flattening of the same rules (same region, other cut)."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from nftsg.translators.firstmatch import first_match_pieces, first_match_region
from nftsg.translators.flatten import Ranked, decide, flatten
from nftsg.translators.nft import Span

DOMAIN = (Span(0, 7), Span(0, 15), Span(0, 7))
ORDERS = ((0, 1, 2), (1, 0, 2), (2, 1, 0))
SPLITS = ((0, 1, 2), (2, 1, 0), (1, 2, 0))


def spans(hi: int) -> st.SearchStrategy[Span]:
    return st.tuples(st.integers(0, hi), st.integers(0, hi)).map(lambda t: Span(min(t), max(t)))


rules = st.lists(
    st.builds(
        lambda box, prio, drop, want_drop: Ranked(box, (prio, 0 if drop else 1), drop == want_drop),
        st.tuples(spans(7), spans(15), spans(7)),
        st.integers(1, 4),
        st.booleans(),
        st.just(False),
    ),
    max_size=12,
)


def _flipped(rules: list[Ranked], flip: bool) -> list[Ranked]:
    """The same rules wanting the other verdict (drop regions as well as accept ones)."""
    return [r._replace(wanted=r.wanted != flip) for r in rules]


def _inside(box: tuple[Span, ...], point: tuple[int, ...]) -> bool:
    return all(s.lo <= v <= s.hi for s, v in zip(box, point, strict=True))


def _points() -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(s.lo, s.hi + 1) for s in DOMAIN)))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rules=rules, split=st.sampled_from(SPLITS), flip=st.booleans())
def test_pieces_are_disjoint_and_hold_exactly_the_points_a_wanted_rule_decides(
    rules: list[Ranked], split: tuple[int, ...], flip: bool
) -> None:
    rules = _flipped(rules, flip)
    pieces = first_match_pieces(rules, 10_000, split)
    assert pieces is not None
    boxes = [b for b, _ in pieces]
    assert boxes == sorted(boxes)
    for point in _points():
        holding = [(b, i) for b, i in pieces if _inside(b, point)]
        assert len(holding) <= 1, (point, holding)
        assert bool(holding) == (decide(rules, point) is True), point
        if holding:  # the label is the deciding rule (or one of equal rank and box)
            deciding = min(
                (r for r in rules if _inside(r.box, point)), key=lambda r: (r.rank, r.box)
            )
            assert rules[holding[0][1]] == deciding


@settings(max_examples=100, deadline=None, derandomize=True)
@given(rules=rules)
def test_same_region_as_the_canonical_flattening_and_independent_of_rule_order(
    rules: list[Ranked],
) -> None:
    region = first_match_region(rules, 10_000, SPLITS[0])
    assert region == first_match_region(rules[::-1], 10_000, SPLITS[0])
    canonical = flatten(rules, DOMAIN, ORDERS, 10_000) or []
    assert region is not None
    for point in _points():
        assert any(_inside(b, point) for b in region) == any(_inside(b, point) for b in canonical)


def test_overlap_of_other_fields_does_not_cut() -> None:
    # The diagram repeats the narrow rule's neighbours' ports in every peer piece;
    # here two rules that do not overlap stay one box each.
    wide_peer = Ranked((Span(0, 7), Span(0, 15), Span(3, 3)), (1, 1), True)
    narrow_peer = Ranked((Span(0, 7), Span(4, 4), Span(5, 5)), (1, 1), True)
    assert first_match_region([wide_peer, narrow_peer], 100, SPLITS[0]) == sorted(
        [wide_peer.box, narrow_peer.box]
    )
    # A drop of the same priority wins the tie: a hole in the accept.
    whole = (Span(0, 7), Span(0, 15), Span(0, 7))
    drop_tie = Ranked((Span(2, 3), Span(0, 15), Span(0, 7)), (5, 0), False)
    assert first_match_region([Ranked(whole, (5, 1), True), drop_tie], 100, SPLITS[0]) == [
        (Span(0, 1), *whole[1:]),
        (Span(4, 7), *whole[1:]),
    ]


def test_beyond_the_limit_there_are_no_pieces() -> None:
    points = [
        Ranked((Span(a, a), Span(b, b), Span(0, 7)), (1, 1), True)
        for a in range(0, 8, 2)
        for b in range(0, 16, 2)
    ]
    assert first_match_region(points, len(points), SPLITS[0]) is not None
    assert first_match_region(points, len(points) - 1, SPLITS[0]) is None


# Five fields with real widths, so the index's port bins and wide boxes are used;
# checked at every box corner and its neighbours (where the region can change).
_WIDE = (Span(0, 255), Span(0, 2**32 - 1), Span(0, 65535), Span(0, 65535), Span(0, 2**32 - 1))


def _wide_span(hi: int) -> st.SearchStrategy[Span]:
    edge = st.sampled_from([0, 1, 6, 17, 1023, 1024, 5000, 9000, 65535, hi]).filter(
        lambda v: v <= hi
    )
    return st.tuples(edge | st.integers(0, hi), edge | st.integers(0, hi)).map(
        lambda t: Span(min(t), max(t))
    )


wide_rules = st.lists(
    st.builds(
        lambda box, prio, drop: Ranked(box, (prio, 0 if drop else 1), not drop),
        st.tuples(*(_wide_span(s.hi) for s in _WIDE)),
        st.integers(1, 3),
        st.booleans(),
    ),
    max_size=7,  # random 5-field boxes fragment fast: 7 keep the pieces in the hundreds
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(rules=wide_rules)
def test_five_fields_with_port_bins(rules: list[Ranked]) -> None:
    pieces = first_match_pieces(rules, 2_000)
    if pieces is None:  # beyond the limit (tested above): nothing to check
        return
    boxes = [b for b, _ in pieces]
    for a, b in itertools.combinations(boxes, 2):
        assert any(x.hi < y.lo or y.hi < x.lo for x, y in zip(a, b, strict=True)), (a, b)
    values = [
        sorted(
            {
                v
                for r in rules
                for v in (r.box[f].lo, r.box[f].hi, r.box[f].lo - 1, r.box[f].hi + 1)
                if _WIDE[f].lo <= v <= _WIDE[f].hi
            }
            or {0}
        )
        for f in range(5)
    ]
    rnd = random.Random(len(rules))
    for _ in range(1500):
        point = tuple(rnd.choice(v) for v in values)
        assert any(_inside(b, point) for b in boxes) == (decide(rules, point) is True), point
