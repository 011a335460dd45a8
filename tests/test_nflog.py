"""The denied-flow log reader's pure parts (agent/nflog.py): netlink framing of
NFLOG messages, the flow read from a packet's headers, the record naming the ENI,
direction and deciding rule (from the counted program's labels, or from the
evaluator), and the agent-side token bucket. The real socket is tested in
netns-tests/test_log_rules.py."""

from __future__ import annotations

import socket
import struct

import pytest
from nftsg.agent.nflog import (
    NFULA_IFINDEX_INDEV,
    NFULA_IFINDEX_OUTDEV,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULNL_MSG_CONFIG,
    NFULNL_MSG_PACKET,
    TokenBucket,
    _attr,
    _nlmsg,
    config_messages,
    flow_of,
    parse_messages,
    record_of,
)
from nftsg.translators.compiler import DeniedLog, compile_vpc, log_prefix, profile_id
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import Network
from strategies import VPC_ID, endpoint_of, network_of, random_flows, random_model

PORTED = {6, 17, 33, 132}


def packet_bytes(flow: Flow) -> bytes:
    l4 = struct.pack(">HH", flow.sport, flow.dport) if flow.protocol in PORTED else b"\0" * 4
    l4 += b"\0" * 16
    if flow.src_ip.version == 4:
        head = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(l4), 0, 0, 64, flow.protocol, 0)
        return head + flow.src_ip.packed + flow.dst_ip.packed + l4
    head = struct.pack(">IHBB", 6 << 28, len(l4), flow.protocol, 64)
    return head + flow.src_ip.packed + flow.dst_ip.packed + l4


def nflog_message(prefix: str, indev: int, outdev: int, payload: bytes, family: int) -> bytes:
    attrs = (
        _attr(NFULA_PREFIX, prefix.encode() + b"\0")
        + _attr(NFULA_IFINDEX_INDEV, struct.pack(">I", indev))
        + _attr(NFULA_IFINDEX_OUTDEV, struct.pack(">I", outdev))
        + _attr(NFULA_PAYLOAD, payload)
    )
    return _nlmsg(NFULNL_MSG_PACKET, 0, 0, family, 2, attrs)


def test_config_messages_bind_and_set_copy_mode() -> None:
    bind, mode = config_messages(7)
    for msg in (bind, mode):
        length, kind = struct.unpack_from("=IH", msg)
        assert length == len(msg) and kind == NFULNL_MSG_CONFIG
        assert struct.unpack_from(">H", msg, 18) == (7,)  # res_id: the group, big endian


def test_an_error_answer_raises() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -16) + b"\0" * 16
    with pytest.raises(OSError, match="EBUSY"):
        list(parse_messages(err))
    ok = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert list(parse_messages(ok)) == []


def _records_match_the_evaluator(network: Network, counted: bool, seed: int) -> int:
    logged = frozenset(g for g, sg in network.groups.items() if sg.vpc_id == VPC_ID)
    prog = compile_vpc(network, VPC_ID, counters=counted, denied_log=DeniedLog(logged))
    # Interface indexes of the router namespace, as the kernel would report them.
    names = sorted(
        {e.ifname for e in network.enis.values()} | {h.ifname for h in network.externals.values()}
    )
    index = {name: i + 10 for i, name in enumerate(names)}
    checked = 0
    for flow in random_flows(network, seed, 40):
        decision = evaluate(network, flow)
        if decision.reason != "rules":
            continue
        for side in (decision.egress, decision.ingress):
            if side is None or side.verdict != "drop":
                continue
            eni = network.enis[side.eni_id]
            prefix = log_prefix(profile_id(eni.group_ids), side.direction)
            fam = socket.AF_INET if flow.src_ip.version == 4 else socket.AF_INET6
            src, dst = endpoint_of(network, flow.src_ip), endpoint_of(network, flow.dst_ip)
            data = nflog_message(
                prefix, index[src.ifname], index[dst.ifname], packet_bytes(flow), fam
            )
            (got,) = list(parse_messages(data))
            assert flow_of(got.payload) == Flow(
                src_ip=flow.src_ip,
                dst_ip=flow.dst_ip,
                protocol=flow.protocol,
                dport=flow.dport if flow.protocol in PORTED else 0,
                sport=flow.sport if flow.protocol in PORTED else 0,
            )
            by_index = {i: n for n, i in index.items()}
            rec = record_of(got, "r", by_index.get, network, prog)
            assert rec is not None
            assert (rec["eni_id"], rec["direction"]) == (side.eni_id, side.direction), rec
            assert (rec["src"], rec["dst"]) == (str(flow.src_ip), str(flow.dst_ip))
            if side.rule is None:
                assert rec["decided_by"] == "default", (rec, side)
            else:
                assert rec["decided_by"] == "rule", (rec, side)
                assert rec["rule_id"] == side.rule.rule_id, (rec, side)
                assert rec["decided_from"] == ("program" if counted else "evaluator")
            checked += 1
    return checked


@pytest.mark.parametrize("counted", [False, True])
def test_records_name_the_evaluators_deciding_rule_or_default(counted: bool) -> None:
    checked = 0
    for seed in range(0, 80, 4):
        checked += _records_match_the_evaluator(network_of(random_model(seed)), counted, seed)
    assert checked > 50


def test_foreign_prefixes_are_not_records() -> None:
    network = network_of(random_model(3))
    flow = random_flows(network, 3, 1)[0]
    data = nflog_message("other:x:in", 1, 2, packet_bytes(flow), socket.AF_INET)
    (got,) = list(parse_messages(data))
    assert record_of(got, "r", lambda _i: None, network, None) is None


def test_token_bucket_allows_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    now[0] += 1 / 3
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # the burst never exceeds the rate
