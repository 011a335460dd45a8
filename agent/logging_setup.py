"""Where the agent's logs go: journald when systemd runs it, plain stderr otherwise.

systemd connects a service's stderr to journald and says so in JOURNAL_STREAM
(``device:inode`` of that stream). Then records go to the journal natively
through Debian's python3-systemd (`systemd.journal.JournalHandler`): each
carries PRIORITY, SYSLOG_IDENTIFIER=nftsg, LOGGER, CODE_FILE/CODE_LINE and
the thread, so `journalctl -u nftsg-agent -p err` and field matches work.
Without that module the stream itself is used, each line starting with its
syslog priority (``<3>``), which journald parses. Anything else (a terminal,
the log file of a lab's background agent) gets timestamped plain lines.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
IDENTIFIER = "nftsg"

# logging level -> syslog priority (sd-daemon(3) prefixes)
_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    for level in sorted(_PRIORITIES, reverse=True):
        if levelno >= level:
            return _PRIORITIES[level]
    return 7


class PriorityPrefixFormatter(logging.Formatter):
    """``<N>logger: message``: journald takes N as the record's priority; every line of a
    multi-line record (a traceback) carries it, so none is logged as info."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd gave us."""
    environ = dict(os.environ) if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def journal_handler() -> logging.Handler | None:
    """python3-systemd's native journal handler, or None when it is not installed."""
    try:
        journal = importlib.import_module("systemd.journal")  # Debian's python3-systemd
    except ImportError:
        return None
    handler: logging.Handler = journal.JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)
    return handler


def make_handler(
    stream: TextIO | None = None,
    environ: dict[str, str] | None = None,
    native_handler: Callable[[], logging.Handler | None] = journal_handler,
) -> tuple[logging.Handler, str]:
    """The handler for this process and its kind: "journal", "journal-stream" or "plain"."""
    stream = sys.stderr if stream is None else stream
    if stderr_is_journal(stream, environ):
        native = native_handler()
        if native is not None:
            return native, "journal"
        handler = logging.StreamHandler(stream)
        handler.setFormatter(PriorityPrefixFormatter("%(name)s: %(message)s"))
        return handler, "journal-stream"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler, "plain"


def configure(level: str = "info", stream: TextIO | None = None) -> str:
    """Set up the root logger once for the agent; returns the kind of handler chosen.

    Called again (SIGHUP) it only changes the level."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(getattr(h, "_nftsg", False) for h in root.handlers):
        handler, kind = make_handler(stream)
        handler._nftsg = kind  # type: ignore[attr-defined]
        root.addHandler(handler)
        return kind
    return next(str(getattr(h, "_nftsg", "")) for h in root.handlers if getattr(h, "_nftsg", False))


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
