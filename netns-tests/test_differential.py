"""Differential test: random models, random flows, real packets vs the reference evaluator.

For each seed, a random valid topology (`tests/strategies.py`) is brought up
with `nftsg lab up` on a fresh lab and random flows of that model are sent
with real packets (their exact addresses, protocol and ports). Each outcome
must equal the evaluator's verdict. A second test runs the same seeds as one
chain of `nftsg lab up` on one lab, so that converging from one wildly
different model to the next is checked with the same probes.

A disagreement is first confirmed (probed again), then checked again on a
fresh lab, then shrunk: rules,
groups, ENIs, instances, external hosts and prefix lists are dropped one at a
time while the disagreement persists, and the failure prints the seed, the
flow, the evaluator's explanation and the shrunk topology as YAML.

Seeds: NFTSG_DIFF_SEEDS=1,2,3 (default 1-6); flows per seed: NFTSG_DIFF_FLOWS (default 40).
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e import REPO, CliLab, cli_lab, describe, flow_label, probe_flow, write_yaml
from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.explain import summarise
from nftsg.translators.network import IPAddress, Network

sys.path.insert(0, str(REPO / "tests"))
from strategies import network_of, random_flows, random_model

SEEDS = [int(s) for s in os.environ.get("NFTSG_DIFF_SEEDS", "1,2,3,4,5,6").split(",") if s]
FLOWS = int(os.environ.get("NFTSG_DIFF_FLOWS", "40"))
TIMEOUT = 0.3  # per probe; an allowed probe answers in about a millisecond
MAX_SHRINK_STEPS = 80


@dataclass(frozen=True)
class Result:
    flow: Flow
    expected: bool
    observed: bool
    detail: str

    @property
    def agrees(self) -> bool:
        return self.expected == self.observed


def probeable_flows(network: Network, seed: int, n: int) -> list[Flow]:
    """`n` random flows whose two ends live in different namespaces (a flow between two
    ENIs of one instance never leaves it, so no firewall sees it), without ICMP of the
    other family (ICMPv6 in IPv4, ICMP in IPv6): conntrack classifies such packets as
    invalid, and invalid packets are dropped by design, whatever an ALL rule says."""
    out = []
    for flow in random_flows(network, seed, 4 * n):
        if flow.protocol == (58 if flow.version == 4 else 1):
            continue
        src, dst = network.eni_by_address(flow.src_ip), network.eni_by_address(flow.dst_ip)
        if src is not None and dst is not None and src.instance_id == dst.instance_id:
            continue
        out.append(flow)
        if len(out) == n:
            break
    return out


def run_flows(lab: CliLab, network: Network, flows: list[Flow]) -> list[Result]:
    """Probe concurrently. Probes that would listen on the same address and port share a
    lane; probes that would bind the same source address and port take turns."""
    lanes: dict[tuple[int, str, int], list[Flow]] = defaultdict(list)
    for flow in flows:
        lanes[(flow.protocol, str(flow.dst_ip), flow.dport)].append(flow)
    source_locks: dict[tuple[int, str, int], threading.Lock] = defaultdict(threading.Lock)
    for flow in flows:
        source_locks[(flow.protocol, str(flow.src_ip), flow.sport)]

    def run_lane(lane: list[Flow]) -> list[Result]:
        out = []
        for flow in lane:
            expected = evaluate(network, flow).verdict == "accept"
            with source_locks[(flow.protocol, str(flow.src_ip), flow.sport)]:
                observed, detail = probe_flow(lab, network, flow, TIMEOUT)
            out.append(Result(flow, expected, observed, detail))
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [r for lane in pool.map(run_lane, lanes.values()) for r in lane]
    order = {flow: i for i, flow in enumerate(flows)}
    return sorted(results, key=lambda r: order[r.flow])


def still_disagrees(lab: CliLab, network: Network, flow: Flow) -> bool:
    expected: bool = evaluate(network, flow).verdict == "accept"
    observed, _detail = probe_flow(lab, network, flow, TIMEOUT)
    return bool(observed) != expected


# -- shrinking -----------------------------------------------------------------------


def owned(network: Network, address: IPAddress) -> bool:
    return network.eni_by_address(address) is not None or (
        network.external_by_address(address) is not None
    )


def _candidates(model: dict[str, Any], keep: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Models with one thing less; `keep` holds the instance ids / external names of the flow."""
    for gi, group in enumerate(model.get("security_groups", [])):
        for ri in range(len(group.get("permissions", []))):
            smaller = copy.deepcopy(model)
            del smaller["security_groups"][gi]["permissions"][ri]
            yield f"rule {ri} of {group['security_group_id']}", smaller
    for xi, ext in enumerate(model.get("external_hosts", [])):
        if ext["name"] not in keep:
            smaller = copy.deepcopy(model)
            del smaller["external_hosts"][xi]
            yield f"external host {ext['name']}", smaller
    for ii, inst in enumerate(model.get("instances", [])):
        if inst["instance_id"] not in keep:
            smaller = copy.deepcopy(model)
            del smaller["instances"][ii]
            yield f"instance {inst['instance_id']}", smaller
        for ni in range(len(inst.get("network_interfaces", []))):
            smaller = copy.deepcopy(model)
            del smaller["instances"][ii]["network_interfaces"][ni]
            yield f"ENI {ni + 1} of {inst['instance_id']}", smaller
    for gi, group in enumerate(model.get("security_groups", [])):
        gid = group["security_group_id"]
        smaller = copy.deepcopy(model)
        del smaller["security_groups"][gi]
        for inst in smaller["instances"]:
            for holder in (inst, *inst.get("network_interfaces", [])):
                ids = holder.get("security_group_ids")
                if ids and gid in ids:
                    ids.remove(gid)
                    if not ids:
                        del holder["security_group_ids"]  # -> the VPC default group
        yield f"group {gid}", smaller
    for pi, plist in enumerate(model.get("prefix_lists", [])):
        smaller = copy.deepcopy(model)
        del smaller["prefix_lists"][pi]
        yield f"prefix list {plist['prefix_list_id']}", smaller


def shrink(
    lab: CliLab, model: dict[str, Any], flow: Flow, workdir: Path
) -> tuple[dict[str, Any], list[str]]:
    """Drop parts of the model one at a time (converging the lab with `lab up`) while the
    flow still disagrees with the evaluator; returns the smallest model found."""
    network = network_of(model)
    keep = set()
    for address in (flow.src_ip, flow.dst_ip):
        eni = network.eni_by_address(address)
        ext = network.external_by_address(address)
        keep.add(eni.instance_id if eni is not None else ext.name if ext is not None else "")
    dropped: list[str] = []
    steps = 0
    progress = True
    while progress and steps < MAX_SHRINK_STEPS:
        progress = False
        for what, smaller in _candidates(model, keep):
            try:
                smaller_net = network_of(smaller)
            except EcsError:
                continue
            if not (owned(smaller_net, flow.src_ip) and owned(smaller_net, flow.dst_ip)):
                continue
            steps += 1
            proc = lab.run("lab", "up", str(write_yaml(workdir / "shrink.yaml", smaller)))
            if proc.returncode == 0 and still_disagrees(lab, smaller_net, flow):
                model, network = smaller, smaller_net
                dropped.append(what)
                progress = True
                break
            if steps >= MAX_SHRINK_STEPS:
                break
    return model, dropped


# -- the test -------------------------------------------------------------------------------


def fresh_up(lab: CliLab, path: Path) -> None:
    down = lab.down()
    assert down.returncode == 0, describe(down)
    lab.up(path)


def investigate(
    lab: CliLab, seed: int, model: dict[str, Any], network: Network, bad: Result, workdir: Path
) -> str:
    """Confirm, re-check on a fresh lab, shrink; returns the failure report."""
    flow = bad.flow
    lines = [
        f"seed {seed}: {flow_label(network, flow)}",
        f"  evaluator: {'accept' if bad.expected else 'drop'}: "
        f"{summarise(evaluate(network, flow), flow)}",
        f"  kernel:    {'allowed' if bad.observed else 'dropped'} ({bad.detail})",
    ]
    confirmed = still_disagrees(lab, network, flow)
    lines.append(f"  probed again on the converged lab: {'same' if confirmed else 'agrees now'}")
    model_path = write_yaml(workdir / f"seed{seed}.yaml", model)
    fresh_up(lab, model_path)
    fresh = still_disagrees(lab, network, flow)
    lines.append(
        f"  on a fresh lab: {'disagrees too' if fresh else 'agrees (a convergence bug: the lab '}"
        + ("" if fresh else "reached this model from the previous seed's model)")
    )
    if not fresh:
        return "\n".join(lines)
    shrunk, dropped = shrink(lab, model, flow, workdir)
    shrunk_path = write_yaml(workdir / f"seed{seed}-shrunk.yaml", shrunk)
    fresh_up(lab, shrunk_path)
    reproduces = still_disagrees(lab, network_of(shrunk), flow)
    lines += [
        f"  shrunk by dropping {len(dropped)} parts; reproduces on a fresh lab: {reproduces}",
        f"  reproduce: nftsg lab up {shrunk_path.name}; then send the flow above",
        "  shrunk topology:",
        *("    " + line for line in yaml.safe_dump(shrunk, sort_keys=False).splitlines()),
    ]
    return "\n".join(lines)


@pytest.fixture
def lab(tmp_path: Path, lab_prefix: str) -> Iterator[CliLab]:
    with cli_lab(lab_prefix, tmp_path / "state") as cli:
        yield cli
    assert not cli.namespaces()


def probe_seed(lab: CliLab, seed: int) -> tuple[dict[str, Any], Network, list[Result], str]:
    """Probe the random flows of `seed` on the lab (which holds the seed's model)."""
    model = random_model(seed)
    network = network_of(model)
    t0 = time.monotonic()
    results = run_flows(lab, network, probeable_flows(network, seed, FLOWS))
    line = (
        f"seed {seed}: {len(network.instances)} instances, {len(network.enis)} ENIs, "
        f"{sum(len(g.rules) for g in network.groups.values())} rules, {len(results)} probes, "
        f"{sum(r.observed for r in results)} allowed, {sum(not r.agrees for r in results)} "
        f"disagree ({time.monotonic() - t0:.2f} s)"
    )
    return model, network, results, line


def test_real_traffic_agrees_with_the_evaluator_on_random_models(
    lab: CliLab, tmp_path: Path
) -> None:
    """Each seed on a fresh lab: `nftsg lab down`, `nftsg lab up seedN.yaml`, probe."""
    started = time.monotonic()
    failures: list[str] = []
    totals = {"probes": 0, "allowed": 0, "dropped": 0}
    lines: list[str] = []
    for seed in SEEDS:
        path = write_yaml(tmp_path / f"seed{seed}.yaml", random_model(seed))
        t0 = time.monotonic()
        fresh_up(lab, path)
        t_up = time.monotonic() - t0
        model, network, results, line = probe_seed(lab, seed)
        lines.append(f"{line}, lab down+up {t_up:.2f} s")
        totals["probes"] += len(results)
        totals["allowed"] += sum(r.observed for r in results)
        totals["dropped"] += sum(not r.observed for r in results)
        bad = [r for r in results if not r.agrees]
        if bad:
            others = "".join(f"\n  also: {flow_label(network, r.flow)}" for r in bad[1:])
            failures.append(investigate(lab, seed, model, network, bad[0], tmp_path) + others)
    print("\n".join(lines))
    print(f"total {totals}, {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures)
    assert totals["probes"] == FLOWS * len(SEEDS)
    assert totals["allowed"] > 0 and totals["dropped"] > 0


def test_lab_converges_from_one_random_model_to_the_next(lab: CliLab, tmp_path: Path) -> None:
    """The same seeds as one chain of `nftsg lab up` on one lab: each model replaces the
    previous one (instances, ENIs and addresses move around), and the traffic must then
    agree with the new model exactly as on a fresh lab."""
    failures: list[str] = []
    lines: list[str] = []
    previous = None
    for seed in SEEDS:
        path = write_yaml(tmp_path / f"seed{seed}.yaml", random_model(seed))
        t0 = time.monotonic()
        proc = lab.run("lab", "up", str(path))
        t_up = time.monotonic() - t0
        if proc.returncode != 0:
            failures.append(f"lab up seed {seed} over seed {previous} failed:\n{describe(proc)}")
            fresh_up(lab, path)  # go on from a clean lab
        else:
            _, network, results, line = probe_seed(lab, seed)
            lines.append(f"{line}, converged from seed {previous} in {t_up:.2f} s")
            failures += [
                f"seed {seed} over seed {previous}: {flow_label(network, r.flow)}: evaluator "
                f"{'accept' if r.expected else 'drop'}, kernel "
                f"{'allowed' if r.observed else 'dropped'} ({r.detail})"
                for r in results
                if not r.agrees
            ]
        previous = seed
    print("\n".join(lines))
    assert not failures, "\n\n".join(failures)
