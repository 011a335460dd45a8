"""The NEWGEN messages of nftables' event group, parsed from raw netlink bytes."""

from __future__ import annotations

import os
import struct

from nftsg.agent.events import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_NEWGEN,
    NFTA_GEN_ID,
    NFTA_GEN_PROC_NAME,
    NFTA_GEN_PROC_PID,
    Commit,
    is_own_thread,
    parse_commits,
)

NFT_MSG_NEWRULE = 6


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, attrs: bytes) -> bytes:
    body = b"\x01\x00\x00\x00" + attrs  # nfgenmsg: family, version, res_id
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 0, 0) + body


def _newgen(generation: int, pid: int, name: bytes) -> bytes:
    return _message(
        NFT_MSG_NEWGEN,
        _attr(NFTA_GEN_ID, generation.to_bytes(4, "big"))
        + _attr(NFTA_GEN_PROC_PID, pid.to_bytes(4, "big"))
        + _attr(NFTA_GEN_PROC_NAME, name + b"\0"),
    )


def test_newgen_is_found_among_other_messages() -> None:
    rule = _message(NFT_MSG_NEWRULE, _attr(1, b"nftsg\0") + _attr(2, b"forward\0"))
    data = rule + _newgen(77, 4242, b"nft") + rule
    assert list(parse_commits(data)) == [Commit(generation=77, pid=4242, process="nft")]


def test_two_commits_in_one_datagram() -> None:
    data = _newgen(1, 10, b"nft") + _newgen(2, 11, b"iptables-nft")
    assert [c.generation for c in parse_commits(data)] == [1, 2]
    assert [c.process for c in parse_commits(data)] == ["nft", "iptables-nft"]


def test_truncated_input_ends_the_walk() -> None:
    data = _newgen(5, 10, b"nft")
    assert list(parse_commits(data[:-3])) == []
    assert list(parse_commits(b"")) == []
    assert list(parse_commits(struct.pack("=IHHII", 4, 0, 0, 0, 0))) == []


def test_missing_attributes() -> None:
    data = _message(NFT_MSG_NEWGEN, _attr(NFTA_GEN_ID, (9).to_bytes(4, "big")))
    assert list(parse_commits(data)) == [Commit(generation=9, pid=None, process="")]


def test_own_threads() -> None:
    assert is_own_thread(os.getpid())
    assert not is_own_thread(2**22 + 12345)
