"""Fixtures of the Docker lab tests: dockerd, the images, a unique prefix per run.

dockerd is started if none answers (and stopped again at the end); the
debootstrapped base image is kept as the cache between runs, the nftsg image
of this run is removed with everything else it made.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_dockerlab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dockerlab", REPO / "deploy/docker/dockerlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dockerlab"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dockerlab() -> ModuleType:
    if os.geteuid() != 0:
        pytest.skip("the Docker lab needs root")
    return _load_dockerlab()


def docker_netns() -> set[str]:
    try:
        return set(os.listdir("/var/run/docker/netns"))
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session")
def docker_env(dockerlab: ModuleType) -> Iterator[dict[str, Any]]:
    """(client, image tag, timings); removes the image (and stops a dockerd it started)."""
    client, started = dockerlab.docker_client()
    netns_before = docker_netns()
    tag = f"nftsg-lab:t{secrets.token_hex(4)}"
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        dockerlab.ensure_images(client, tag)
        timings["images"] = time.monotonic() - t0
        print(f"\nimages built in {timings['images']:.1f} s")
        yield {"client": client, "image": tag, "timings": timings}
    finally:
        leftover = [
            c.name
            for c in client.containers.list(all=True)
            if c.name.startswith("t") and c.labels.get(dockerlab.LABEL, "").startswith("t")
        ]
        for name in leftover:
            client.containers.get(name).remove(force=True)
        dockerlab.remove_image(client, tag)
        # dockerd removes a gone container's namespace file lazily (libnetwork
        # collects them about a minute later): wait for that, then check.
        deadline = time.monotonic() + 120
        while not docker_netns() <= netns_before and time.monotonic() < deadline:
            time.sleep(1)
        left = docker_netns() - netns_before
        client.close()
        if started:
            dockerlab.stop_dockerd()
        assert not leftover, f"containers left behind: {leftover}"
        assert not left, f"dockerd left container namespaces: {sorted(left)}"


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"
