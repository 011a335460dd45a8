"""Shared fixtures of the real-namespace tests.

- Not root: every test here is skipped with one clear reason.
- `run_prefix`: a prefix unique to this test run (`nt` + 6 hex digits); every
  namespace a test creates starts with it (labs use `lab_prefix`, which
  extends it), so tests never touch namespaces they did not create.
- At session end, anything still carrying the run prefix is removed, as a
  safety net behind each fixture's own cleanup.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import pytest
from nftsg.agent import netns
from nftsg.agent.lab import Lab
from nftsg.translators.network import Network
from nftsg.translators.validate import load_network

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

RUN_PREFIX = "nt" + secrets.token_hex(3)
_lab_numbers = count(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(pytest.mark.netns)
            if os.geteuid() != 0:
                item.add_marker(
                    pytest.mark.skip(
                        reason="netns-tests need root (network namespaces, veths, nftables)"
                    )
                )


def _sweep(prefix: str) -> list[str]:
    removed = []
    for name in netns.list_namespaces():
        if name.startswith(prefix):
            netns.delete(name)
            removed.append(name)
    return removed


@pytest.fixture(scope="session", autouse=True)
def run_prefix() -> Iterator[str]:
    """Unique per run; everything with it is removed at session end."""
    yield RUN_PREFIX
    if os.geteuid() == 0:
        _sweep(RUN_PREFIX)


@pytest.fixture
def lab_prefix(run_prefix: str) -> str:
    """A fresh lab prefix inside this run's prefix (labs of two tests never meet)."""
    return f"{run_prefix}{next(_lab_numbers)}"


@pytest.fixture
def make_lab(lab_prefix: str) -> Iterator[Callable[[], Lab]]:
    """Factory: `make_lab()` -> a Lab with a fresh prefix, destroyed after the test."""
    labs: list[Lab] = []
    numbers = count()

    def factory() -> Lab:
        n = next(numbers)
        lab = Lab(lab_prefix if n == 0 else f"{lab_prefix}x{n}")
        labs.append(lab)
        return lab

    yield factory
    for lab in labs:
        lab.destroy()


@pytest.fixture
def lab(make_lab: Callable[[], Lab]) -> Lab:
    """An empty Lab with a fresh prefix; destroyed after the test, pass or fail."""
    return make_lab()


def network_from_file(name: str) -> Network:
    return load_network((EXAMPLES / name).read_text())


@pytest.fixture(scope="session")
def demo_network() -> Network:
    """The demo topology, `examples/three-tier.yaml`."""
    return network_from_file("three-tier.yaml")


@pytest.fixture(scope="module")
def demo_lab(run_prefix: str, demo_network: Network) -> Iterator[Lab]:
    """The demo topology built once per module (no firewall); destroyed afterwards."""
    lab = Lab(f"{run_prefix}d{next(_lab_numbers)}")
    try:
        lab.apply(demo_network)
        yield lab
    finally:
        lab.destroy()
