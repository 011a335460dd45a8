"""Netlink events in named namespaces: nftables commits in the VPC routers (drift
repair) and, through `Subscriptions`, link changes for host mode
(`agent/host_mode.py`).

One netlink socket per router namespace, subscribed to NFNLGRP_NFTABLES (what
`nft monitor` listens to), read by one thread. Every nftables transaction ends
with an NFT_MSG_NEWGEN message naming the process that committed it
(NFTA_GEN_PROC_PID, the committing thread's id). A commit by any thread of
this process is the agent's own and is ignored; any other commit marks its
namespace as changed, and the agent's next round checks that router by content
and rewrites it if it drifted (`Agent.step`). So a tamper is repaired within a
round (50 ms) instead of at the next periodic check, which stays as the
backstop.

Why a plain socket and not `nft monitor`: both see a commit within a
millisecond or two here, but `nft monitor` is a process per router (and an
`ip netns exec` around it) whose text output must be parsed, while a socket
is a file descriptor in this process and the message to read is three
attributes. Why not pyroute2's NFTSocket: it decodes every message it reads
(one per rule: tens of thousands for a full rewrite of a large table); only
NEWGEN is of interest here, so the messages are walked by header and
everything else is skipped unparsed.

Loops cannot start: the agent's own repairs are filtered by thread id, and
when that filter cannot work (the agent in a PID namespace of its own sees
other ids than the kernel reports) each own commit costs one check by content,
which finds the table equal and rewrites nothing.

Lost events cannot hide drift: an overflowing socket (ENOBUFS, seen while a
large table is rewritten: the kernel sends one message per rule) marks the
namespace changed, and so does opening a socket (commits before it was open
were not seen). Cost: with a subscriber the kernel builds a notification per
object, so committing 20k rules took ~0.68 s instead of ~0.6 s here.

A namespace that is missing is retried every `rescan_every` seconds; one that
was deleted or replaced (a new namespace under the same name) is noticed by
the inode of its file and watched afresh. Sockets are closed for namespaces no
longer watched, so that they do not keep a deleted namespace alive.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import netns
from .nft_backend import spawned_by_us

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
NLMSG_ERROR = 2

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG_LEN = 4
_NLATTR = struct.Struct("=HH")
_RCVBUF = 4 << 20  # bytes; a full rewrite of a large table overflows it anyway


@dataclass(frozen=True, slots=True)
class Commit:
    """One nftables transaction as the kernel announced it (NFT_MSG_NEWGEN)."""

    generation: int
    pid: int | None  # the committing thread, None if the kernel did not say
    process: str  # its command name, "" if not given


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_commits(data: bytes) -> Iterator[Commit]:
    """The NEWGEN messages in one datagram read from an NFNLGRP_NFTABLES socket; every
    other message is skipped by its header. Truncated input ends the walk."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            yield _commit(data[offset + _NLMSGHDR.size + _NFGENMSG_LEN : offset + length])
        offset += _align(length)


def _commit(payload: bytes) -> Commit:
    attrs: dict[int, bytes] = {}
    at = 0
    while at + _NLATTR.size <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, at)
        if length < _NLATTR.size:
            break
        attrs[kind & 0x7FFF] = payload[at + _NLATTR.size : at + length]
        at += _align(length)
    generation = attrs.get(NFTA_GEN_ID, b"")
    pid = attrs.get(NFTA_GEN_PROC_PID, b"")
    return Commit(
        generation=int.from_bytes(generation, "big") if len(generation) == 4 else -1,
        pid=int.from_bytes(pid, "big") if len(pid) == 4 else None,
        process=attrs.get(NFTA_GEN_PROC_NAME, b"").split(b"\0", 1)[0].decode(errors="replace"),
    )


def is_own_thread(pid: int, own_pid: int | None = None) -> bool:
    """Is `pid` (a thread id as the kernel reports it) a thread of this process?"""
    return os.path.exists(f"/proc/{own_pid or os.getpid()}/task/{pid}")


OWN_NAMESPACE = ""  # the key of the agent's own namespace (host mode's default)


def _ns_identity(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat("/proc/self/ns/net" if name == OWN_NAMESPACE else netns.path_of(name))
    except (OSError, netns.NetnsError):
        return None
    return st.st_dev, st.st_ino


def open_socket(name: str, protocol: int, group: int) -> socket.socket:
    """A non-blocking netlink socket of `protocol` subscribed to `group`, bound to
    namespace `name` (OWN_NAMESPACE: this process's)."""
    if name == OWN_NAMESPACE:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    else:
        with netns.entered(name):
            # A netlink socket belongs to the namespace of the thread creating it.
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Subscriptions:
    """One netlink multicast group watched in a set of namespaces from one thread.

    `watch(names)` sets the namespaces (thread-safe, cheap when unchanged);
    `changed()` returns and clears the namespaces marked since the last call.
    Subclasses decide what marks a namespace (`_received`); opening a
    subscription and losing messages (ENOBUFS) always do.
    """

    protocol = NETLINK_NETFILTER
    group = NFNLGRP_NFTABLES
    what = "nftables commits"

    def __init__(self, *, rescan_every: float = 1.0) -> None:
        self.rescan_every = rescan_every
        self.overflows = 0
        self._lock = threading.Lock()
        self._wanted: frozenset[str] = frozenset()
        self._changed: set[str] = set()
        self._sockets: dict[str, tuple[socket.socket, tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"netlink-{self.group}", daemon=True)
        self._thread.start()

    def _received(self, name: str, data: bytes) -> None:
        self._mark(name)

    # -- the agent's side -------------------------------------------------------
    def watch(self, names: Iterable[str]) -> None:
        wanted = frozenset(names)
        with self._lock:
            if wanted == self._wanted:
                return
            self._wanted = wanted
        self._wake()

    def changed(self) -> set[str]:
        with self._lock:
            out, self._changed = self._changed, set()
        return out

    def watching(self) -> set[str]:
        """Namespaces with an open subscription now (for tests and status)."""
        with self._lock:
            return set(self._sockets)

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        for sock, _ in self._sockets.values():
            sock.close()
        self._sockets.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the thread -------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (already woken) or closed
            pass

    def _mark(self, name: str) -> None:
        with self._lock:
            self._changed.add(name)

    def _rescan(self) -> None:
        with self._lock:
            wanted = self._wanted
        for name in list(self._sockets):
            sock, opened_on = self._sockets[name]
            if name not in wanted or _ns_identity(name) != opened_on:
                sock.close()
                with self._lock:
                    del self._sockets[name]
        for name in sorted(wanted - set(self._sockets)):
            identity = _ns_identity(name)
            if identity is None:
                continue  # not there (yet): next rescan
            try:
                sock = open_socket(name, self.protocol, self.group)
            except (OSError, netns.NetnsError) as exc:
                log.warning("cannot watch %s in %s: %s", self.what, name or "own namespace", exc)
                continue
            if _ns_identity(name) != identity:  # replaced while we opened it
                sock.close()
                continue
            with self._lock:
                self._sockets[name] = (sock, identity)
            self._mark(name)  # commits before now were not seen
            log.debug("watching %s in %s", self.what, name or "own namespace")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._rescan()
            except Exception:  # never let the watcher die: the periodic check is behind it
                log.exception("nftables event watcher: rescan failed")
            by_fd = {sock.fileno(): name for name, (sock, _) in self._sockets.items()}
            try:
                ready, _, _ = select.select([self._wake_r, *by_fd], [], [], self.rescan_every)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                name = by_fd[fd]
                entry = self._sockets.get(name)
                if entry is not None:
                    self._drain(name, entry[0])

    def _drain(self, name: str, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Events were lost: whatever they were, check by content.
                    self.overflows += 1
                    self._mark(name)
                    continue
                log.warning("%s in %s: %s; watching afresh", self.what, name, exc)
                self._mark(name)
                sock.close()
                with self._lock:
                    self._sockets.pop(name, None)
                return
            if not data:
                return
            self._received(name, data)


class TableEvents(Subscriptions):
    """Commits to nftables by other processes (NFNLGRP_NFTABLES) in the router
    namespaces. Counters: `seen` (commits by others), `own` (ours, ignored),
    `overflows`."""

    def __init__(self, *, rescan_every: float = 1.0, own_pid: int | None = None) -> None:
        self.own_pid = own_pid or os.getpid()
        self.seen = 0
        self.own = 0
        self._commits: list[tuple[str, Commit]] = []
        super().__init__(rescan_every=rescan_every)

    def _received(self, name: str, data: bytes) -> None:
        for commit in parse_commits(data):
            if commit.pid is not None and (
                is_own_thread(commit.pid, self.own_pid) or spawned_by_us(commit.pid)
            ):
                self.own += 1
                continue
            self.seen += 1
            with self._lock:
                self._commits.append((name, commit))
                self._changed.add(name)

    def changed(self) -> set[str]:
        """As `Subscriptions.changed`, and logs the foreign commits behind it. Logged
        here, in the caller's thread: the agent forks (pyroute2's namespace helpers),
        and a fork while this thread holds the log stream's lock would leave the
        child without it."""
        with self._lock:
            commits, self._commits = self._commits, []
        for name, commit in commits:
            log.info(
                "nftables commit in %s by %s (pid %s), generation %s: checking the table",
                name,
                commit.process or "?",
                commit.pid,
                commit.generation,
            )
        return super().changed()
