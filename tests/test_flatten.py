"""Flattening prioritised boxes into disjoint boxes of one verdict (translators/flatten.py)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from nftsg.translators.flatten import Ranked, decide, flatten, flatten_labelled
from nftsg.translators.nft import Span

# A small 3-field space, so every point can be checked.
DOMAIN = (Span(0, 7), Span(0, 15), Span(0, 7))
ORDERS = ((0, 1, 2), (1, 0, 2), (2, 1, 0))


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


def _decider(rules: list[Ranked], point: tuple[int, ...]) -> int | None:
    """Index of the deciding rule: smallest rank, the first given among equals."""
    holding = [i for i, r in enumerate(rules) if _inside(r.box, point)]
    return min(holding, key=lambda i: (rules[i].rank, i)) if holding else None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rules=rules)
def test_labelled_boxes_name_the_deciding_rule_and_cover_the_same_region(
    rules: list[Ranked],
) -> None:
    labelled = flatten_labelled(rules, DOMAIN, ORDERS, limit=10_000)
    assert labelled is not None
    plain = flatten(rules, DOMAIN, ORDERS, limit=10_000)
    assert plain is not None
    assert len(labelled) >= len(plain)
    for point in itertools.product(*(range(s.lo, s.hi + 1) for s in DOMAIN)):
        holding = [(b, i) for b, i in labelled if _inside(b, point)]
        assert len(holding) <= 1, (point, holding)
        decider = _decider(rules, point)
        if decider is not None and rules[decider].wanted:
            assert holding and holding[0][1] == decider, point
        else:
            assert not holding, point
        assert bool(holding) == any(_inside(b, point) for b in plain)


def test_labelled_keeps_adjacent_rules_of_one_verdict_apart() -> None:
    left = Ranked((Span(0, 3), Span(0, 15), Span(0, 7)), (1, 1), True)
    right = Ranked((Span(4, 7), Span(0, 15), Span(0, 7)), (2, 1), True)
    assert flatten([left, right], DOMAIN, ORDERS, 100) == [DOMAIN]
    assert flatten_labelled([left, right], DOMAIN, ORDERS, 100) == [
        (left.box, 0),
        (right.box, 1),
    ]
    # One rule covering everything: a single box, labelled.
    assert flatten_labelled([right, Ranked(DOMAIN, (1, 1), True)], DOMAIN, ORDERS, 100) == [
        (DOMAIN, 1)
    ]
    assert flatten_labelled([], DOMAIN, ORDERS, 100) == []
