"""Where the agent keeps its state, and the names it gives what it creates.

Everything a lab creates carries its prefix (namespaces `<prefix>-...`), so
`lab down` removes exactly that; tests use a unique prefix and a private state
directory per run through the same knobs users have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/nftsg")
DEFAULT_PREFIX = "nftsg"
DEFAULT_TABLE = "nftsg"


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
