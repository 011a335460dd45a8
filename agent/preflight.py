"""What the agent and `nftsg cleanup` check before they change anything.

Each check raises `PreflightError`, one line with a code that says what is
missing and how to get it; the commands print it and exit 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PreflightError(Exception):
    """The host cannot run this command as it is; str() is ``Code: message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def require_root() -> None:
    if os.geteuid() != 0:
        raise PreflightError(
            "NotRoot",
            "needs root (network namespaces and nftables need CAP_NET_ADMIN and CAP_SYS_ADMIN)",
        )


def require_nftables() -> None:
    """Debian's nftables bindings load and reach libnftables."""
    try:
        import nftables

        nftables.Nftables()
    except ImportError:
        raise PreflightError(
            "NftablesMissing",
            "the nftables Python bindings are missing: install Debian's nftables and "
            "python3-nftables and link them into the venv (scripts/install.sh does both)",
        ) from None
    except OSError as exc:
        raise PreflightError(
            "NftablesMissing", f"libnftables cannot be loaded ({exc}): install Debian's nftables"
        ) from None


def require_writable_state_dir(state_dir: Path) -> None:
    """`state_dir` exists (it is created if missing) and a file can be created in it.

    Tried for real: root passes every permission check of access(2), yet a
    read-only mount or a full disk still refuse it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".nftsg-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PreflightError(
            "StateDirNotWritable",
            f"cannot write the state directory {state_dir}: {reason} "
            "(use --state-dir or NFTSG_STATE_DIR, or fix its mount and permissions)",
        ) from None
