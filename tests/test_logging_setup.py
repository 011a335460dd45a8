"""Logs go to journald when stderr is systemd's journal stream, plain lines otherwise."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from nftsg.agent import logging_setup


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("nftsg.agent.daemon", level, __file__, 1, message, None, None)


def test_plain_lines_without_systemd(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream:
        handler, kind = logging_setup.make_handler(stream, environ={})
        assert kind == "plain"
        text = handler.format(record(logging.ERROR, "boom"))
    assert "ERROR nftsg.agent.daemon: boom" in text
    assert not text.startswith("<")


def test_journal_stream_of_another_fd_is_not_ours(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(other.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert not logging_setup.stderr_is_journal(stream, env)
        assert logging_setup.make_handler(stream, env)[1] == "plain"


def test_journal_stream_gets_priority_prefixes_on_every_line(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logging_setup.stderr_is_journal(stream, env)
        handler, kind = logging_setup.make_handler(stream, env, native_handler=lambda: None)
        assert kind == "journal-stream"
        assert handler.format(record(logging.WARNING, "drift")) == ("<4>nftsg.agent.daemon: drift")
        assert handler.format(record(logging.ERROR, "a\nb")).splitlines() == [
            "<3>nftsg.agent.daemon: a",
            "<3>b",
        ]
        assert handler.format(record(logging.DEBUG, "x")).startswith("<7>")


def test_journal_stream_prefers_the_native_handler(tmp_path: Path) -> None:
    native = logging.NullHandler()
    with open(tmp_path / "err", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        handler, kind = logging_setup.make_handler(stream, env, native_handler=lambda: native)
    assert (handler, kind) == (native, "journal")


def test_debians_journal_handler_is_found_when_installed() -> None:
    handler = logging_setup.journal_handler()
    if handler is None:
        pytest.skip("python3-systemd is not linked into this venv (scripts/install.sh does it)")
    assert type(handler).__name__ == "JournalHandler"


def test_syslog_priorities() -> None:
    assert [
        logging_setup.syslog_priority(level)
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 50)
    ] == [7, 6, 4, 3, 2]
