"""The element-batch encoder (agent/nft_wire.py) against bytes nft 1.0.6 sent.

The expected bytes are NFTA_SET_ELEM_LIST_ELEMENTS payloads captured from `nft add
element ...` (strace of its sendmsg) for the layout's set types; the kernel-side
proof (same listing as libnftables, failures atomic) is
netns-tests/test_netlink_elements.py.
"""

from __future__ import annotations

import struct

import pytest
from nftsg.agent import nft_wire as wire
from nftsg.agent.nft_wire import SetInfo, Unsupported

# Kernel descriptions as `nft list` leaves them (NFT_MSG_NEWSET of each set).
RULES_V4 = SetInfo("f", 0x84, 0x0C1CD347, 20)  # proto . ipv4 . port . port . ipv4, interval
RULES_V6 = SetInfo("f6", 0x84, 0x0C20D348, 44)
PORTS = SetInfo("ports", 0, 0x29, 16)  # ifname
PORT_ADDRS = SetInfo("pa", 0, 0xA47, 20)  # ifname . ipv4_addr
DISPATCH = SetInfo("d", 0x8, 0x29, 16, wire.NFT_DATA_VERDICT, 16)  # ifname : verdict


def _captured(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr.replace(" ", ""))


# nft add element inet t f '{ 17 . 10.0.0.0/8 . 80 . 1024-65535 . 10.1.2.3 }'
NFT_RULE_V4 = _captured(
    "3c000180 1c000180 18000100 11000000 0a000000 00500000 04000000 0a010203"
    " 1c000a80 18000100 11000000 0affffff 00500000 ffff0000 0a010203"
)
# nft add element inet t f '{ 17 . 10.9.9.9 . 80 . 80 . 10.1.2.3 }' (a point: both ends)
NFT_POINT_V4 = _captured(
    "3c000180 1c000180 18000100 11000000 0a090909 00500000 00500000 0a010203"
    " 1c000a80 18000100 11000000 0a090909 00500000 00500000 0a010203"
)
# nft add element inet t f6 '{ 17 . 2001:db8::/32 . 80 . 0-65535 . ::1 }'
NFT_RULE_V6 = _captured(
    "6c000180 34000180 30000100 11000000 20010db8 00000000 00000000 00000000"
    " 00500000 00000000 00000000 00000000 00000000 00000001"
    " 34000a80 30000100 11000000 20010db8 ffffffff ffffffff ffffffff"
    " 00500000 ffff0000 00000000 00000000 00000000 00000001"
)
# nft add element inet t d '{ "veth2" : jump c1 }'
NFT_DISPATCH = _captured(
    "34000180 18000180 14000100 76657468 32000000 00000000 00000000"
    " 18000280 14000280 08000100 fffffffd 07000200 63310000"
)
# nft delete element inet t d '{ "veth2" }'
NFT_DISPATCH_DELETE = _captured("1c000180 18000180 14000100 76657468 32000000 00000000 00000000")


def _concat(*atoms: object) -> dict[str, object]:
    return {"concat": list(atoms)}


def test_rule_box_v4_is_what_nft_sends() -> None:
    elem = _concat(
        17, {"prefix": {"addr": "10.0.0.0", "len": 8}}, 80, {"range": [1024, 65535]}, "10.1.2.3"
    )
    assert wire.encode_element(RULES_V4, elem, add=True) == NFT_RULE_V4
    # Deleting sends the same element.
    assert wire.encode_element(RULES_V4, elem, add=False) == NFT_RULE_V4


def test_point_in_an_interval_set_carries_both_ends() -> None:
    elem = _concat(17, "10.9.9.9", 80, 80, "10.1.2.3")
    assert wire.encode_element(RULES_V4, elem, add=True) == NFT_POINT_V4


def test_rule_box_v6() -> None:
    elem = _concat(
        17, {"prefix": {"addr": "2001:db8::", "len": 32}}, 80, {"range": [0, 65535]}, "::1"
    )
    assert wire.encode_element(RULES_V6, elem, add=True) == NFT_RULE_V6


def test_address_range_and_proto_range() -> None:
    elem = _concat({"range": [1, 5]}, {"range": ["10.0.0.1", "10.0.0.5"]}, 22, 0, "0.0.0.0")
    key, end = wire.encode_key(RULES_V4, elem)
    assert key == bytes.fromhex("01000000 0a000001 00160000 00000000 00000000".replace(" ", ""))
    assert end == bytes.fromhex("05000000 0a000005 00160000 00000000 00000000".replace(" ", ""))


def test_verdict_map_element_and_delete() -> None:
    assert wire.encode_element(DISPATCH, ["veth2", {"jump": {"target": "c1"}}], add=True) == (
        NFT_DISPATCH
    )
    assert wire.encode_element(DISPATCH, "veth2", add=False) == NFT_DISPATCH_DELETE


def test_plain_sets() -> None:
    key, end = wire.encode_key(PORTS, "veth1")
    assert (key, end) == (b"veth1" + b"\0" * 11, None)
    key, end = wire.encode_key(PORT_ADDRS, _concat("veth1", "10.0.0.1"))
    assert key == b"veth1" + b"\0" * 11 + bytes([10, 0, 0, 1]) and end is None


def test_concat_fields_from_the_kernel_type() -> None:
    assert RULES_V4.fields() == (12, 7, 13, 13, 7)
    assert RULES_V6.fields() == (12, 8, 13, 13, 8)
    assert PORT_ADDRS.fields() == (41, 7)
    assert PORTS.fields() == (41,)


@pytest.mark.parametrize(
    ("info", "elem"),
    [
        (PORTS, "x" * 16),  # longer than IFNAMSIZ - 1
        (PORTS, "eth*"),  # a wildcard is not a plain name
        (PORTS, 7),
        (PORT_ADDRS, _concat("veth1", {"range": ["10.0.0.1", "10.0.0.2"]})),  # no intervals
        (PORT_ADDRS, _concat("veth1", "2001:db8::1")),  # wrong family
        (RULES_V4, _concat(17, "10.0.0.1", 80, 80)),  # a field missing
        (RULES_V4, _concat(17, "10.0.0.1", 70000, 80, "10.0.0.2")),  # not a port
        (RULES_V4, _concat(17, {"prefix": {"addr": "10.0.0.1", "len": 8}}, 1, 1, "10.0.0.2")),
        (RULES_V4, _concat(17, "10.0.0.9", {"range": [9, 1]}, 1, "10.0.0.2")),  # empty
        (RULES_V4, {"elem": {"val": _concat(17, "10.0.0.1", 1, 1, "10.0.0.2")}}),
        (DISPATCH, ["veth2", {"jump": {"target": ""}}]),
        (DISPATCH, ["veth2", {"queue": None}]),
    ],
)
def test_what_it_does_not_write_is_refused(info: SetInfo, elem: object) -> None:
    with pytest.raises(Unsupported):
        wire.encode_element(info, elem, add=True)


@pytest.mark.parametrize(
    "info",
    [
        SetInfo("r", 0x4, 7, 4),  # one-field interval (rbtree)
        SetInfo("t", 0x10, 7, 4),  # timeouts
        SetInfo("m", 0x8, 7, 4, 7, 4),  # a data map
        SetInfo("x", 0, 19, 4),  # mark: a type not in the layout
    ],
)
def test_set_kinds_it_does_not_write_are_refused(info: SetInfo) -> None:
    with pytest.raises(Unsupported):
        wire.check_set(info)


def test_element_ops_only_for_element_only_batches() -> None:
    add = {"add": {"element": {"family": "inet", "table": "t", "name": "ports", "elem": ["a"]}}}
    delete = {
        "delete": {"element": {"family": "inet", "table": "t", "name": "ports", "elem": ["b"]}}
    }
    ops = wire.element_ops([delete, add])
    assert ops is not None and [(op.add, op.set, op.elements) for op in ops] == [
        (False, "ports", ("b",)),
        (True, "ports", ("a",)),
    ]
    rule = {"add": {"rule": {"family": "inet", "table": "t", "chain": "c", "expr": []}}}
    flush = {"flush": {"set": {"family": "inet", "table": "t", "name": "ports"}}}
    for other in (rule, flush, {"add": {"set": {"family": "inet", "table": "t", "name": "s"}}}):
        assert wire.element_ops([add, other]) is None


def test_batch_framing_and_split() -> None:
    elems = tuple(_concat(6, f"10.0.{i // 256}.{i % 256}", 80, 80, "10.1.0.1") for i in range(3000))
    ops = [wire.ElementOp(True, "inet", "t", "f", elems)]
    msgs = wire.batch(ops, {("inet", "t", "f"): RULES_V4}, 100)
    hdr = struct.Struct("=IHHII")
    kinds = [hdr.unpack_from(m)[1] for m in msgs]
    seqs = [hdr.unpack_from(m)[3] for m in msgs]
    assert kinds[0] == wire.NFNL_MSG_BATCH_BEGIN and kinds[-1] == wire.NFNL_MSG_BATCH_END
    assert set(kinds[1:-1]) == {(10 << 8) | wire.NFT_MSG_NEWSETELEM}
    # 3000 elements of 64 bytes do not fit one 16-bit attribute: several messages.
    assert len(msgs) > 3 and seqs == list(range(100, 100 + len(msgs)))
    for m in msgs:
        assert hdr.unpack_from(m)[0] == len(m)
        # BEGIN and END name the nftables subsystem (res_id, big endian).
        if m in (msgs[0], msgs[-1]):
            assert m[16:20] == b"\x00\x00\x00\x0a"
    count = 0
    for m in msgs[1:-1]:
        attrs = wire.attributes(m[20:])
        assert attrs[1] == b"t\0" and attrs[2] == b"f\0"
        assert len(m) < 65535
        count += len(attrs[3]) // len(NFT_POINT_V4)
    assert count == 3000


def test_replies_ack_error_and_set() -> None:
    hdr = struct.Struct("=IHHII")
    orig = hdr.pack(16, 0x0A0C, 0x405, 7, 0)
    ack = struct.pack("=i", 0) + orig
    msg_ack = hdr.pack(16 + len(ack), wire.NLMSG_ERROR, wire.NLM_F_CAPPED, 7, 1) + ack
    text = b"overlap\0"
    tlv = struct.pack("=HH", 4 + len(text), wire.NLMSGERR_ATTR_MSG) + text
    err = struct.pack("=i", -17) + orig + tlv
    flags = wire.NLM_F_CAPPED | wire.NLM_F_ACK_TLVS
    msg_err = hdr.pack(16 + len(err), wire.NLMSG_ERROR, flags, 8, 1) + err
    replies = list(wire.parse_replies(msg_ack + msg_err))
    assert [(r.seq, r.error, r.text) for r in replies] == [(7, 0, ""), (7, -17, "overlap")]
