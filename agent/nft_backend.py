"""Programming nftables in named network namespaces through libnftables JSON.

A libnftables context talks to the namespace of the thread that created it
(docs/kernel-notes.md, "libnftables contexts and namespaces"), so each namespace gets one
worker thread that enters it once, creates its own context and serves every
request for that namespace from a queue. The root namespace is refused unless
the backend is built with ``allow_root_namespace=True``: the agent only ever
touches namespaces it created.

The commands are plain libnftables JSON command dicts (``{"add": {...}}``); the
backend writes the ``{"nftables": [...]}`` envelope itself, so callers never
depend on this module's internals and the fake backend takes the same input.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import json
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"

# Loading ~40k rules leaves ~350 MB in glibc's free lists (docs/kernel-notes.md
# §"Memory after large loads"); trim after batches at least this long (a
# one-element update is not worth it).
_TRIM_AFTER_COMMANDS = 1000

# The pids of the last nft children (bounded: only recent ones can still have
# commit events waiting to be read).
_SPAWNED: collections.deque[int] = collections.deque(maxlen=256)

_T = TypeVar("_T")
# One NFT_MSG_GETGEN socket per namespace worker thread.
_GEN_SOCKETS = threading.local()
# One element-batch socket per namespace worker thread (agent/nft_fastpath.py).
_ELEMENT_CHANNELS = threading.local()
# NFTSG_NETLINK_ELEMENTS=0 sends element batches through libnftables too (the
# benchmark compares both ways; a fallback if the kernel ever answers oddly).
NETLINK_ELEMENTS_ENV = "NFTSG_NETLINK_ELEMENTS"


def netlink_elements_default() -> bool:
    return os.environ.get(NETLINK_ELEMENTS_ENV, "1") != "0"


def _brief(text: str, limit: int = 600) -> str:
    """libnftables echoes the whole JSON batch in its error text; keep logs readable."""
    lines = [
        line if len(line) <= limit else line[:limit] + " ..." for line in text.strip().splitlines()
    ]
    return "\n".join(lines[:8])


class NftError(Exception):
    """An nft transaction, check or listing failed; nothing was changed.

    Carries what an operator needs to reproduce it: the libnftables return
    code, its error text and the exact batch of commands.
    """

    def __init__(
        self,
        message: str,
        *,
        rc: int,
        stderr: str,
        batch: list[dict[str, Any]],
        namespace: str,
    ) -> None:
        super().__init__(message)
        self.rc = rc
        self.stderr = stderr
        self.batch = batch
        self.namespace = namespace

    def __str__(self) -> str:
        first = self.stderr.strip().splitlines()[:1]
        detail = f": {first[0]}" if first else ""
        return (
            f"{self.args[0]} (namespace {self.namespace!r}, rc={self.rc}, "
            f"{len(self.batch)} commands){detail}"
        )


class NamespaceNotFound(NftError):
    """The namespace does not exist (or was replaced); it is never created."""


class Backend(Protocol):
    """What the agent needs from nftables, per namespace."""

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        """Run `commands` as one atomic transaction; on NftError nothing changed."""

    def check(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        """Dry-run `commands`; raises NftError where apply would."""

    def generation(self, namespace: str) -> int:
        """A number that moves with every commit in the namespace (nftables' generation)."""

    def list_table(self, namespace: str, family: str, table: str) -> dict[str, Any] | None:
        """The table's JSON listing (``{"nftables": [...]}``), None if absent."""

    def delete_table(self, namespace: str, family: str, table: str) -> None:
        """Delete the table with its contents; no error if it is absent."""

    def release(self, namespace: str) -> None:
        """Forget per-namespace resources (the namespace is going away)."""

    def close(self) -> None:
        """Release everything."""


def envelope(commands: list[dict[str, Any]]) -> dict[str, Any]:
    return {"nftables": commands}


def table_ref(family: str, table: str) -> dict[str, Any]:
    return {"table": {"family": family, "name": table}}


def delete_table_commands(family: str, table: str) -> list[dict[str, Any]]:
    # nft 1.0.6 has no "destroy": adding first makes the delete succeed
    # whether or not the table existed, and both happen in one transaction.
    return [{"add": table_ref(family, table)}, {"delete": table_ref(family, table)}]


def check_namespace_name(namespace: str) -> None:
    """Refuse names that are not a plain entry of /run/netns."""
    if not namespace or "/" in namespace or namespace in (".", ".."):
        raise NamespaceNotFound(
            f"invalid namespace name {namespace!r}",
            rc=-1,
            stderr="",
            batch=[],
            namespace=namespace,
        )


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return


def nft_program() -> str | None:
    """The nft command line tool (the same libnftables), or None: then everything
    runs in this process's libnftables."""
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )


def _run_nft(args: list[str], text: str | None = None) -> tuple[int, str, str]:
    """Run nft in a child process. Called from a namespace worker thread: a child
    inherits the namespaces of the thread that spawns it, so nft works in the
    worker's namespace without entering it itself."""
    program = nft_program()
    if program is None:
        raise FileNotFoundError("nft")
    with subprocess.Popen(
        [program, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        # Known before it can commit: its commits are ours (agent/events.py).
        _SPAWNED.append(proc.pid)
        out, err = proc.communicate(text)
    return proc.returncode, out, err


def spawned_by_us(pid: int) -> bool:
    """Was `pid` one of the last nft children of this process (its commits are the
    agent's own, though the child is gone by the time the event is read)?"""
    return pid in _SPAWNED


class _NamespaceWorker:
    """One thread living in one namespace, owning one libnftables context."""

    def __init__(self, namespace: str, enter: bool) -> None:
        self.namespace = namespace
        self._enter = enter
        self._requests: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._ready: Future[None] = Future()
        self._ns_ino: tuple[int, int] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"nft-{namespace or 'root'}", daemon=True
        )
        self._thread.start()
        self._ready.result()  # re-raises NamespaceNotFound from the thread

    def call(self, fn: Callable[[Any], _T]) -> _T:
        fut: Future[_T] = Future()
        self._requests.put((fn, fut))
        return fut.result()

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _missing(self, why: str) -> NamespaceNotFound:
        return NamespaceNotFound(why, rc=-1, stderr="", batch=[], namespace=self.namespace)

    def _enter_namespace(self) -> None:
        # Imported here so that importing this module (e.g. for NftError or the
        # protocol) needs neither pyroute2 nor root.
        from pyroute2 import netns

        path = os.path.join(NETNS_DIR, self.namespace)
        if not os.path.exists(path):
            raise self._missing(f"namespace {self.namespace!r} does not exist")
        try:
            # flags=0: without it pyroute2 creates a missing namespace.
            netns.setns(self.namespace, flags=0)
        except OSError as exc:
            raise self._missing(f"cannot enter namespace {self.namespace!r}: {exc}") from exc
        st = os.stat("/proc/thread-self/ns/net")
        self._ns_ino = (st.st_dev, st.st_ino)

    def still_there(self) -> None:
        """Raise if the namespace was deleted or replaced since we entered it.

        A thread inside a namespace keeps it alive after `ip netns del`, so
        without this check rules would silently go to an orphan namespace.
        """
        if self._ns_ino is None:
            return
        try:
            st = os.stat(os.path.join(NETNS_DIR, self.namespace))
        except FileNotFoundError:
            raise self._missing(f"namespace {self.namespace!r} was deleted") from None
        if (st.st_dev, st.st_ino) != self._ns_ino:
            raise self._missing(f"namespace {self.namespace!r} was replaced")

    def _run(self) -> None:
        try:
            if self._enter:
                self._enter_namespace()
            import nftables

            ctx = nftables.Nftables()
            ctx.set_json_output(True)
            ctx.set_handle_output(False)
            # Listings without counter values: stable across calls and
            # comparable with the fake backend's state.
            ctx.set_stateless_output(True)
        except NftError as exc:
            self._ready.set_exception(exc)
            return
        except (OSError, ImportError) as exc:
            self._ready.set_exception(self._missing(f"cannot start nft worker: {exc}"))
            return
        self._ready.set_result(None)
        while True:
            item = self._requests.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                self.still_there()
            except NamespaceNotFound as exc:
                # Leave the orphan namespace; a later call starts afresh.
                fut.set_exception(exc)
                return
            try:
                fut.set_result(fn(ctx))
            except BaseException as exc:  # handed to the caller's thread, never lost
                fut.set_exception(exc)


class NftBackend:
    """The real backend: libnftables JSON, one worker thread per namespace."""

    def __init__(
        self, *, allow_root_namespace: bool = False, netlink_elements: bool | None = None
    ) -> None:
        self._allow_root = allow_root_namespace
        self._workers: dict[str, _NamespaceWorker] = {}
        self._lock = threading.Lock()
        self.last_timing: dict[str, float] = {}
        # Element-only batches straight over nfnetlink (docs/kernel-notes.md
        # §"Element batches over nfnetlink"); everything else through libnftables.
        self.netlink_elements = (
            netlink_elements_default() if netlink_elements is None else netlink_elements
        )
        # How the last transaction per namespace went: "netlink" or "libnftables".
        self.last_path: dict[str, str] = {}

    # -- plumbing --------------------------------------------------------

    def _worker(self, namespace: str | None) -> _NamespaceWorker:
        name = namespace or ""
        if name == "" and not self._allow_root:
            raise NamespaceNotFound(
                "the root namespace is not managed by this backend",
                rc=-1,
                stderr="",
                batch=[],
                namespace="",
            )
        if name:
            check_namespace_name(name)
        with self._lock:
            worker = self._workers.get(name)
            if worker is not None and worker.alive():
                return worker
            worker = _NamespaceWorker(name, enter=bool(name))
            self._workers[name] = worker
            return worker

    def _run(
        self,
        namespace: str,
        commands: list[dict[str, Any]],
        *,
        dry_run: bool,
        what: str,
        counters: bool = False,
    ) -> Any:
        worker = self._worker(namespace)

        def job(ctx: Any) -> Any:
            old = ctx.set_dry_run(dry_run)
            # Listings are stateless (no counter values) except those that read them.
            old_stateless = ctx.set_stateless_output(not counters) if counters else None
            try:
                started = time.perf_counter()
                rc, output, error = ctx.json_cmd(envelope(commands))
                self.last_timing[namespace] = time.perf_counter() - started
            finally:
                ctx.set_dry_run(old)
                if old_stateless is not None:
                    ctx.set_stateless_output(old_stateless)
            if len(commands) >= _TRIM_AFTER_COMMANDS:
                _malloc_trim()
            return rc, output, error

        rc, output, error = worker.call(job)
        if rc != 0:
            log.log(
                logging.DEBUG if what == "listing" else logging.WARNING,
                "nft %s failed in %s: rc=%s %s",
                what,
                namespace,
                rc,
                _brief(error),
            )
            raise NftError(
                f"nft {what} failed",
                rc=rc,
                stderr=error,
                batch=commands,
                namespace=namespace,
            )
        return output

    # -- Backend ---------------------------------------------------------

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        if not commands:
            return
        if self.netlink_elements and self._apply_elements(namespace, commands):
            return
        self._run(namespace, commands, dry_run=False, what="transaction")
        self.last_path[namespace] = "libnftables"

    def _apply_elements(self, namespace: str, commands: list[dict[str, Any]]) -> bool:
        """An element-only batch as one nfnetlink transaction from the namespace's
        worker; False (nothing sent) when the batch is anything else or uses what the
        encoder does not write, then the caller sends it whole through libnftables."""
        from .nft_fastpath import BatchFailed, ElementChannel
        from .nft_wire import Unsupported, element_ops

        ops = element_ops(commands)
        if ops is None:
            return False
        worker = self._worker(namespace)

        def job(_ctx: Any) -> bool | BatchFailed:
            channel = _ELEMENT_CHANNELS.__dict__.get("channel")
            if channel is None:
                # Created in the worker thread, so it is bound to its namespace.
                channel = _ELEMENT_CHANNELS.channel = ElementChannel()
            started = time.perf_counter()
            try:
                channel.apply(ops)
            except Unsupported as exc:
                log.debug("element batch for %s through libnftables: %s", namespace, exc)
                return False
            except BatchFailed as exc:
                return exc
            except OSError as exc:
                # The socket failed (sending, or its answers overflowed): whether the
                # kernel committed is unknown, so this is an error, and the caller
                # forgets the namespace and rewrites it in full. A fresh socket next time.
                _ELEMENT_CHANNELS.channel = None
                channel.close()
                return BatchFailed(exc.errno or 0, f"netlink socket: {exc}")
            self.last_timing[namespace] = time.perf_counter() - started
            return True

        outcome = worker.call(job)
        if isinstance(outcome, BaseException):
            log.warning("nft transaction failed in %s (netlink): %s", namespace, outcome)
            raise NftError(
                "nft transaction failed",
                rc=1,
                stderr=f"Error: Could not process rule: {outcome.detail}\n",
                batch=commands,
                namespace=namespace,
            )
        if outcome:
            self.last_path[namespace] = "netlink"
        return outcome

    def apply_text(self, namespace: str, text: str, commands: int) -> None:
        """Run an nft text batch (`nft_text.full_sync_text`, the cold-load path: faster
        than JSON for a whole big table) as one atomic transaction; on NftError nothing
        changed. `commands` is how many it holds (for the trim and for errors)."""
        worker = self._worker(namespace)

        # A full load goes to the `nft` program when there is one, not to this
        # process's libnftables: parsing it holds ~2.7 KB per set element there
        # (450 MB for the benchmark's 165k elements, docs/design.md "Memory"), which
        # would stay in the agent's peak RSS; the child gives it back as it exits.
        external = nft_program() is not None

        def job(ctx: Any) -> Any:
            started = time.perf_counter()
            if external:
                # The same batch as one transaction, by `nft -f -` (see above).
                rc, output, error = _run_nft(["-f", "-"], text)
                self.last_timing[namespace] = time.perf_counter() - started
                return rc, output, error
            old = ctx.set_json_output(False)
            try:
                rc, output, error = ctx.cmd(text)
                self.last_timing[namespace] = time.perf_counter() - started
            finally:
                ctx.set_json_output(old)
            if commands >= _TRIM_AFTER_COMMANDS or len(text) > 1 << 20:
                _malloc_trim()
            return rc, output, error

        rc, _output, error = worker.call(job)
        if rc != 0:
            log.warning("nft text transaction failed in %s: rc=%s %s", namespace, rc, _brief(error))
            raise NftError(
                "nft transaction failed",
                rc=rc,
                stderr=error,
                batch=[{"text": text[:4000]}],
                namespace=namespace,
            )

    def check(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        if not commands:
            return
        self._run(namespace, commands, dry_run=True, what="check")

    def list_table(self, namespace: str, family: str, table: str) -> dict[str, Any] | None:
        items = self.table_items(namespace, family, table)
        return None if items is None else {"nftables": list(items)}

    def table_items(
        self, namespace: str, family: str, table: str
    ) -> Iterator[dict[str, Any]] | None:
        """The items of the table's JSON listing (``list_table(...)["nftables"]``, in
        the same order, equal item by item), None if the table is absent. Read so that
        neither this process nor libnftables holds the whole table: the table without
        elements (`nft -j -t list table`, in a child process: libnftables fetches every
        element even to list the rules), then each set and map with its elements, one
        libnftables call each (that fetches this set's elements only), yielded as read.
        Not one snapshot: compare `generation` before and after."""
        if nft_program() is None:
            listing = self._list_whole(namespace, family, table)
            return None if listing is None else iter(listing.get("nftables", []))
        rc, out, err = self._worker(namespace).call(
            lambda _ctx: _run_nft(["-j", "-t", "list", "table", family, table])
        )
        if rc != 0:
            if not self._has_table(namespace, family, table):
                return None
            log.debug("nft listing failed in %s: rc=%s %s", namespace, rc, _brief(err))
            raise NftError("nft listing failed", rc=rc, stderr=err, batch=[], namespace=namespace)
        skeleton = json.loads(out).get("nftables", []) if out.strip() else []
        return self._with_elements(namespace, family, table, skeleton)

    def _with_elements(
        self, namespace: str, family: str, table: str, skeleton: list[Any]
    ) -> Iterator[dict[str, Any]]:
        for n, item in enumerate(skeleton):
            skeleton[n] = None  # once yielded, the item is the caller's to keep or drop
            kind = next(iter(item), None) if isinstance(item, dict) else None
            if kind in ("set", "map") and isinstance(item[kind], dict):
                ref = {"family": family, "table": table, "name": item[kind].get("name")}
                listed = self._run(
                    namespace, [{"list": {kind: ref}}], dry_run=False, what="listing"
                )
                found = [i for i in (listed or {}).get("nftables", []) if kind in i]
                item = found[0] if len(found) == 1 else item
            yield item

    def _has_table(self, namespace: str, family: str, table: str) -> bool:
        # The error text for a missing table is not a stable interface; ask which
        # tables exist instead of parsing it.
        tables = self._run(
            namespace, [{"list": {"tables": {"family": family}}}], dry_run=False, what="listing"
        )
        return table in {
            item["table"]["name"] for item in (tables or {}).get("nftables", []) if "table" in item
        }

    def _list_whole(self, namespace: str, family: str, table: str) -> dict[str, Any] | None:
        cmd = [{"list": table_ref(family, table)}]
        try:
            output = self._run(namespace, cmd, dry_run=False, what="listing")
        except NamespaceNotFound:
            raise
        except NftError:
            if not self._has_table(namespace, family, table):
                return None
            raise
        return output if isinstance(output, dict) else None

    def list_set(self, namespace: str, family: str, table: str, name: str) -> dict[str, Any] | None:
        """One set with its elements (and their counters); None if it is not there."""
        cmd = [{"list": {"set": {"family": family, "table": table, "name": name}}}]
        try:
            output = self._run(namespace, cmd, dry_run=False, what="listing", counters=True)
        except NftError:
            return None
        return output if isinstance(output, dict) else None

    def list_table_counters(self, namespace: str, family: str, table: str) -> dict[str, Any] | None:
        """The table with its counter values (hit counters); None if it is not there."""
        cmd = [{"list": table_ref(family, table)}]
        try:
            output = self._run(namespace, cmd, dry_run=False, what="listing", counters=True)
        except NftError:
            return None
        return output if isinstance(output, dict) else None

    def generation(self, namespace: str) -> int:
        """The namespace's nftables ruleset generation: every commit (ours or anyone's)
        moves it, so an unchanged generation means an unchanged table. One netlink
        request (NFT_MSG_GETGEN) from the namespace's worker thread."""

        def job(_ctx: Any) -> int:
            from pyroute2.netlink.nfnetlink.nftsocket import (
                NFT_MSG_GETGEN,
                NFTSocket,
                nft_gen_msg,
            )

            sock = _GEN_SOCKETS.__dict__.get("sock")
            if sock is None:
                # Created in the worker thread, so it is bound to its namespace.
                sock = _GEN_SOCKETS.sock = NFTSocket()
            reply = sock.request_get(nft_gen_msg(), NFT_MSG_GETGEN)
            return int(reply[0].get_attr("NFTA_GEN_ID"))

        return self._worker(namespace).call(job)

    def delete_table(self, namespace: str, family: str, table: str) -> None:
        self._run(namespace, delete_table_commands(family, table), dry_run=False, what="delete")

    def release(self, namespace: str) -> None:
        with self._lock:
            worker = self._workers.pop(namespace, None)
        if worker is not None:
            worker.stop()

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> NftBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps(commands: list[dict[str, Any]]) -> str:
    """The batch as the JSON text nft receives (for logs and error reports)."""
    return json.dumps(envelope(commands), sort_keys=True)
