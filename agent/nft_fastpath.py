"""Send an element-only batch over nfnetlink from a namespace worker thread.

The socket is created in the worker thread, so it belongs to that thread's
namespace (like libnftables' own). Per batch: one request per set named in the
batch for its type (NFT_MSG_GETSET, all in one send: the element bytes depend on
the kernel's key type, and asking for a few sets costs what a few sets cost,
where libnftables dumps all of them), then the batch in one send. The kernel runs
a batch synchronously inside sendmsg, so every answer is queued when it returns:
one ACK per element message, or errors, and then the transaction was aborted.

The commit names this thread (NFTA_GEN_PROC_PID is the committing thread), so
`agent/events.py` recognises it as the agent's own, as it does libnftables'.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any

from . import nft_wire as wire
from .nft_wire import ElementOp, SetInfo, Unsupported

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# Larger batches go to libnftables: a batch is one sendmsg, bounded by the send
# buffer, and at this size the cache read no longer dominates anyway.
MAX_BATCH_BYTES = 4 << 20
_BUFFER = 8 << 20
# The answers are queued when sendmsg returns; this only bounds a kernel that
# would answer asynchronously after all.
_ANSWER_TIMEOUT_S = 5.0


class BatchFailed(Exception):
    """The kernel refused the batch (nothing changed): errno and its explanation."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class ElementChannel:
    """One NETLINK_NETFILTER socket of one namespace worker thread."""

    def __init__(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            for force, plain in (
                (SO_SNDBUFFORCE, socket.SO_SNDBUF),
                (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            ):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, _BUFFER)
                except OSError:  # not root: the ordinary limit
                    sock.setsockopt(socket.SOL_SOCKET, plain, _BUFFER)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._seq = int.from_bytes(os.urandom(3), "big") << 4

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self, count: int) -> int:
        first = self._seq + 1
        self._seq = (self._seq + count + 1) & 0x7FFFFFFF
        return first

    def _drain(self) -> None:
        """Drop answers of an earlier exchange still queued (none normally)."""
        while True:
            try:
                self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    def _exchange(
        self, data: bytes, wanted: set[int], also: frozenset[int] = frozenset()
    ) -> list[wire.Reply]:
        """Send `data`; return the answers whose sequence number is in `wanted` or
        `also`, read until each of `wanted` has had its ACK or error, or any error came
        (the kernel may then stop answering the rest), plus whatever else is queued."""
        self._sock.sendall(data)
        pending = set(wanted)
        replies: list[wire.Reply] = []
        failed = False
        while True:
            try:
                chunk = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not pending or failed:
                    return replies
                ready, _, _ = select.select([self._sock], [], [], _ANSWER_TIMEOUT_S)
                if not ready:
                    raise BatchFailed(errno.ETIMEDOUT, "no answer from the kernel") from None
                continue
            for reply in wire.parse_replies(chunk):
                if reply.seq not in wanted and reply.seq not in also:
                    continue
                replies.append(reply)
                if reply.error is not None:
                    pending.discard(reply.seq)
                    failed = failed or reply.error != 0

    def sets(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], SetInfo]:
        """The kernel's description of each (family, table, set); BatchFailed(ENOENT)
        naming a missing one."""
        self._drain()
        first = self._next_seq(len(keys))
        data = b"".join(
            wire.getset_request(family, table, name, first + i)
            for i, (family, table, name) in enumerate(keys)
        )
        by_seq = {first + i: key for i, key in enumerate(keys)}
        found: dict[tuple[str, str, str], SetInfo] = {}
        for reply in self._exchange(data, set(by_seq)):
            key = by_seq[reply.seq]
            if reply.set_info is not None:
                found[key] = reply.set_info
            elif reply.error:
                family, table, name = key
                raise BatchFailed(
                    -reply.error,
                    f"set {name} in table {family} {table}: {os.strerror(-reply.error)}"
                    + (f" ({reply.text})" if reply.text else ""),
                )
        missing = [k for k in keys if k not in found]
        if missing:
            raise BatchFailed(errno.ENOENT, f"no description of set {missing[0][2]}")
        return found

    def apply(self, ops: list[ElementOp]) -> int:
        """Commit `ops` as one transaction; returns the element messages sent. Raises
        Unsupported before sending anything, BatchFailed if the kernel refused it."""
        keys = sorted({(op.family, op.table, op.set) for op in ops})
        infos = self.sets(keys)
        for info in infos.values():
            wire.check_set(info)
        # Encoded with a provisional sequence, then renumbered: the count of
        # messages is known only once the elements are split.
        messages = wire.batch(ops, infos, 0)
        size = sum(len(m) for m in messages)
        if size > MAX_BATCH_BYTES:
            raise Unsupported(f"batch of {size} bytes")
        first = self._next_seq(len(messages))
        messages = [_renumber(m, first + i) for i, m in enumerate(messages)]
        element_seqs = {first + i for i in range(1, len(messages) - 1)}
        commands = {first + i: i for i in range(1, len(messages) - 1)}
        self._drain()
        # A failed commit is answered on the batch's first message (BEGIN).
        replies = self._exchange(b"".join(messages), element_seqs, frozenset({first}))
        errors = [r for r in replies if r.error]
        if errors:
            worst = errors[0]
            where = (
                f"element message {commands[worst.seq]} of {len(commands)}"
                if worst.seq in commands
                else "the batch"
            )
            raise BatchFailed(
                -worst.error if worst.error else 0,
                f"{os.strerror(-worst.error) if worst.error else 'error'} in {where}"
                + (f": {worst.text}" if worst.text else ""),
            )
        acked = {r.seq for r in replies if r.error == 0}
        if not element_seqs <= acked:
            raise BatchFailed(errno.EPROTO, "the kernel did not acknowledge every message")
        return len(commands)


def _renumber(msg: bytes, seq: int) -> bytes:
    out = bytearray(msg)
    struct.pack_into("=I", out, 8, seq)  # nlmsg_seq, host order
    return bytes(out)


def describe(ops: list[ElementOp]) -> list[dict[str, Any]]:
    """Short form of the batch for errors and logs."""
    return [
        {("add" if op.add else "delete"): {"set": op.set, "elements": len(op.elements)}}
        for op in ops
    ]
