"""Flattening prioritised boxes into disjoint boxes of one verdict (translators/flatten.py)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from nftsg.translators.flatten import Ranked, decide, flatten
from nftsg.translators.nft import Span

# A small 3-field space, so every point can be checked.
DOMAIN = (Span(0, 7), Span(0, 15), Span(0, 7))
ORDERS = ((0, 1, 2), (1, 0, 2), (2, 1, 0))


def spans(hi: int) -> st.SearchStrategy[Span]:
    return st.tuples(st.integers(0, hi), st.integers(0, hi)).map(
        lambda t: Span(min(t), max(t))
    )


rules = st.lists(
    st.builds(
        lambda box, prio, drop, want_drop: Ranked(
            box, (prio, 0 if drop else 1), drop == want_drop
        ),
        st.tuples(spans(7), spans(15), spans(7)),
        st.integers(1, 4),
        st.booleans(),
        st.just(False),
    ),
    max_size=12,
)


def _inside(box: tuple[Span, ...], point: tuple[int, ...]) -> bool:
    return all(s.lo <= v <= s.hi for s, v in zip(box, point, strict=True))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rules=rules)
def test_boxes_are_disjoint_and_hold_exactly_the_points_a_wanted_rule_decides(
    rules: list[Ranked],
) -> None:
    boxes = flatten(rules, DOMAIN, ORDERS, limit=10_000)
    assert boxes is not None
    assert boxes == sorted(set(boxes))
    for point in itertools.product(*(range(s.lo, s.hi + 1) for s in DOMAIN)):
        holding = [b for b in boxes if _inside(b, point)]
        assert len(holding) <= 1, (point, holding)
        assert bool(holding) == (decide(rules, point) is True), point


@settings(max_examples=100, deadline=None, derandomize=True)
@given(rules=rules)
def test_result_does_not_depend_on_rule_order(rules: list[Ranked]) -> None:
    assert flatten(rules, DOMAIN, ORDERS, 10_000) == flatten(rules[::-1], DOMAIN, ORDERS, 10_000)


def test_shadowed_rules_and_ties_follow_the_ecs_order() -> None:
    whole = (Span(0, 7), Span(0, 15), Span(0, 7))
    part = (Span(2, 3), Span(0, 15), Span(0, 7))
    accept = Ranked(whole, (5, 1), True)
    # A drop of the same priority wins the tie: a hole in the accept region.
    drop_tie = Ranked(part, (5, 0), False)
    boxes = flatten([accept, drop_tie], DOMAIN, ORDERS, 100)
    assert boxes == [(Span(0, 1), *whole[1:]), (Span(4, 7), *whole[1:])]
    # A drop at a larger priority number never decides inside the accept.
    assert flatten([accept, Ranked(part, (6, 0), False)], DOMAIN, ORDERS, 100) == [whole]


def test_beyond_the_limit_there_is_no_flattening() -> None:
    # A checkerboard of single-point accepts over a wide drop needs one box per point.
    points = [
        Ranked((Span(a, a), Span(b, b), Span(0, 7)), (1, 1), True)
        for a in range(0, 8, 2)
        for b in range(0, 16, 2)
    ]
    assert flatten(points, DOMAIN, ORDERS, limit=len(points)) is not None
    assert flatten(points, DOMAIN, ORDERS, limit=len(points) - 1) is None
