"""The one module that enters network namespaces.

Everything in nftsg that must act inside a named namespace goes through here:
`entered()` / `run_in()` move only the calling thread (setns(2) is per
thread) and always move it back, `iproute()` opens a netlink socket bound to a
namespace, `write_sysctls()` sets per-namespace sysctls, and `create()` /
`delete()` / `list_namespaces()` manage the named namespaces themselves.

Named namespaces follow iproute2's convention (a bind mount of the namespace
file under the run directory), so `ip netns exec NAME ...` sees them too.
A helper here never creates a namespace as a side effect of looking one up:
pyroute2's own `setns()` does that by default, which turns a typo into a new
empty namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns

# iproute2's run directory (on Debian /var/run is a link to /run).
NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
# The namespace of *this thread*; /proc/self would name the thread group leader's.
_THREAD_NS = "/proc/thread-self/ns/net"

_P = ParamSpec("_P")
_T = TypeVar("_T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """A namespace is missing, cannot be entered, created or removed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"network namespace {name!r}: {message}")
        self.name = name


def _check_name(name: str) -> None:
    # A name is a file name in the run directory: no path tricks.
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise NetnsError(name, "not a valid namespace name")


def path_of(name: str) -> str:
    _check_name(name)
    return os.path.join(NETNS_RUN_DIR, name)


def list_namespaces() -> list[str]:
    """Names of every named namespace on the host, sorted."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def open_fd(name: str) -> int:
    """An O_RDONLY fd of the namespace (caller closes); NetnsError if it is missing."""
    try:
        return os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(name, "does not exist") from None
    except OSError as exc:
        raise NetnsError(name, f"cannot be opened: {exc.strerror}") from None


def _setns(fd: int, name: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(name, f"setns failed: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name`.

    Only this thread moves; other threads are untouched. The thread returns to
    the namespace it was in before, also when the body raises. Refuses (with
    NetnsError) a namespace that does not exist.
    """
    target = open_fd(name)
    try:
        original = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(target)
        raise
    try:
        _setns(target, name)
        try:
            yield
        finally:
            # If this fails the thread would keep working in the wrong
            # namespace; better to stop loudly than to configure the host.
            if _libc.setns(original, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise SystemExit(
                    f"nftsg: cannot return from namespace {name!r}: {os.strerror(err)}"
                )
    finally:
        os.close(original)
        os.close(target)


def enter_for_exec(name: str) -> None:
    """Move the calling thread into `name` for good: only for a process about to exec."""
    target = open_fd(name)
    try:
        _setns(target, name)
    finally:
        os.close(target)


def run_in(name: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call `fn(*args, **kwargs)` inside namespace `name` in this thread; return its result."""
    with entered(name):
        return fn(*args, **kwargs)


def iproute(name: str) -> IPRoute:
    """An IPRoute handle bound to namespace `name`, without a helper process.

    A netlink socket belongs to the namespace of the thread that creates it,
    so creating it while inside the namespace is enough. pyroute2's own
    `IPRoute(netns=...)` forks a helper process per handle (~7 ms each).
    groups=0: a configuration handle need not buffer change notifications.
    """
    with entered(name):
        return IPRoute(groups=0)


def write_sysctls(name: str, values: Mapping[str, str | int]) -> None:
    """Write `net.*` sysctls inside namespace `name`.

    Keys are paths below /proc/sys ("net/ipv4/ip_forward"). /proc/sys/net
    resolves to the namespace of the thread that opens the file.
    """
    with entered(name):
        for key, value in values.items():
            path = os.path.join("/proc/sys", key)
            try:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            except OSError as exc:
                raise NetnsError(name, f"cannot set {key}={value}: {exc.strerror}") from None


def create(name: str) -> None:
    """Create the named namespace; NetnsError if it already exists.

    The calling thread unshares into a fresh namespace, which is bind-mounted
    at the name, then returns to where it was: no helper process.
    """
    path = path_of(name)
    if os.path.exists(path):
        raise NetnsError(name, "already exists")
    original = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(name, f"unshare failed: {os.strerror(err)}")
        try:
            # pyroute2 ports iproute2's mount dance (shared run dir, bind mount).
            _pr_netns.attach(name, "thread-self")
        except OSError as exc:
            _unlink_quietly(path)
            raise NetnsError(name, f"cannot be created: {exc}") from None
        finally:
            if _libc.setns(original, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise SystemExit(
                    f"nftsg: cannot return after creating {name!r}: {os.strerror(err)}"
                )
    finally:
        os.close(original)


def _unlink_quietly(path: str) -> None:
    try:
        _libc.umount2(path.encode(), 2)  # MNT_DETACH; fails harmlessly if not mounted
        os.unlink(path)
    except FileNotFoundError:
        pass


def delete(name: str) -> bool:
    """Remove the named namespace; False if it was already gone.

    The kernel frees the namespace (and the links inside it) once nothing
    holds it any more, asynchronously: callers that reuse link names delete
    the links first.
    """
    path = path_of(name)
    if _libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
            raise NetnsError(name, f"umount failed: {os.strerror(err)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetnsError(name, f"cannot be removed: {exc.strerror}") from None
    return True
