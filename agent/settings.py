"""Where the agent keeps its state, and the names it gives what it creates.

Everything a lab creates carries its prefix (namespaces `<prefix>-...`), so
`lab down` removes exactly that; tests use a unique prefix and a private state
directory per run through the same knobs users have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nftsg.translators.compiler import Layout

DEFAULT_STATE_DIR = Path("/var/lib/nftsg")
DEFAULT_PREFIX = "nftsg"
DEFAULT_TABLE = "nftsg"
# The agent still enforces with the v4 layout by default: the real-traffic scenario
# harness (netns-tests/harness.py) reads v4's per-bucket sets back from the kernel.
# NFTSG_LAYOUT=flat selects the flattened layout (docs/dataplane.md, v5).
DEFAULT_AGENT_LAYOUT: Layout = "v4"


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path
    prefix: str
    table: str

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "agent.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "agent.pid"


def settings_from_env(
    state_dir: str | None = None, prefix: str | None = None, table: str | None = None
) -> Settings:
    """Explicit arguments win over NFTSG_STATE_DIR / NFTSG_PREFIX / NFTSG_TABLE."""
    return Settings(
        state_dir=Path(state_dir or os.environ.get("NFTSG_STATE_DIR") or DEFAULT_STATE_DIR),
        prefix=prefix or os.environ.get("NFTSG_PREFIX") or DEFAULT_PREFIX,
        table=table or os.environ.get("NFTSG_TABLE") or DEFAULT_TABLE,
    )


def layout_from_env() -> Layout:
    """NFTSG_LAYOUT (`flat` or `v4`), else DEFAULT_AGENT_LAYOUT."""
    raw = os.environ.get("NFTSG_LAYOUT") or DEFAULT_AGENT_LAYOUT
    if raw == "flat":
        return "flat"
    if raw == "v4":
        return "v4"
    raise ValueError(f"NFTSG_LAYOUT={raw!r}: expected 'flat' or 'v4'")
