"""Where the agent keeps its state, and the names it gives what it creates.

Everything a lab creates carries its prefix (namespaces `<prefix>-...`), so
`lab down` removes exactly that; tests use a unique prefix and a private state
directory per run through the same knobs users have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT, Layout, check_ct_mark_bit

DEFAULT_STATE_DIR = Path("/var/lib/nftsg")
DEFAULT_PREFIX = "nftsg"
DEFAULT_TABLE = "nftsg"
CT_MARK_BIT_ENV = "NFTSG_CT_MARK_BIT"
# The metrics server's bound HOST:PORT, written by the agent in its state dir.
METRICS_ADDR_FILE = "metrics.addr"


class SettingsError(ValueError):
    """A setting from the environment that cannot be used."""


# The agent enforces the flattened layout (docs/dataplane.md, v5) by default;
# NFTSG_LAYOUT=v4 selects the per-group bucket layout, kept to measure against.
DEFAULT_AGENT_LAYOUT: Layout = "flat"


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path
    prefix: str
    table: str
    # The one conntrack mark bit of revoked flows; the other bits belong to others.
    ct_mark_bit: int = DEFAULT_CT_MARK_BIT
    # From the settings file, environment and options of `nftsg agent`
    # (agent_settings.py); the defaults are those of a settings-less agent.
    api_listen: str = "127.0.0.1:7380"  # the ECS HTTP API
    metrics_listen: str = ""  # Prometheus metrics; "" for none
    log_level: str = "info"
    poll_interval: float = 0.05
    verify_interval: float = 5.0
    selfcheck_interval: float = 60.0
    layout: Layout | None = None  # None: NFTSG_LAYOUT, else DEFAULT_AGENT_LAYOUT
    # Per-rule hit counters in the kernel (docs/dataplane.md "Hit counters"): off by
    # default, they multiply the flat sets' elements (measured 1.3-7x).
    rule_counters: bool = False
    rule_counters_interval: float = 10.0  # seconds between readings of the counters
    # Denied-flow logs (docs/dataplane.md "Denied-flow logs"): the groups whose
    # profiles log dropped packets to NFLOG group `log_denied_nflog_group`, at most
    # `log_denied_rate` packets/s per dropping rule (kernel) and
    # `log_denied_records_rate` records/s written (agent); `log_denied_file`: also
    # JSON lines in the state directory.
    log_denied_groups: tuple[str, ...] = ()
    log_denied_nflog_group: int = 2
    log_denied_rate: int = 10
    log_denied_records_rate: float = 50.0
    log_denied_file: bool = False
    config_path: Path | None = None  # the settings file read, if any

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
    """Explicit arguments win over NFTSG_STATE_DIR / NFTSG_PREFIX / NFTSG_TABLE;
    NFTSG_CT_MARK_BIT sets the conntrack mark bit. Raises SettingsError."""
    return Settings(
        state_dir=Path(state_dir or os.environ.get("NFTSG_STATE_DIR") or DEFAULT_STATE_DIR),
        prefix=prefix or os.environ.get("NFTSG_PREFIX") or DEFAULT_PREFIX,
        table=table or os.environ.get("NFTSG_TABLE") or DEFAULT_TABLE,
        ct_mark_bit=parse_ct_mark_bit(os.environ.get(CT_MARK_BIT_ENV)),
    )


def parse_ct_mark_bit(text: str | None) -> int:
    """The bit in `text` (``0x40000000``, decimal works too); unset or empty: the default."""
    if text is None or not text.strip():
        return DEFAULT_CT_MARK_BIT
    try:
        return check_ct_mark_bit(int(text.strip(), 0))
    except ValueError:
        raise SettingsError(
            f"{CT_MARK_BIT_ENV}={text!r}: must be exactly one bit of the 32-bit conntrack "
            f"mark, such as {DEFAULT_CT_MARK_BIT:#x}"
        ) from None


def layout_from_env() -> Layout:
    """NFTSG_LAYOUT (`flat` or `v4`), else DEFAULT_AGENT_LAYOUT."""
    raw = os.environ.get("NFTSG_LAYOUT") or DEFAULT_AGENT_LAYOUT
    if raw == "flat":
        return "flat"
    if raw == "v4":
        return "v4"
    raise SettingsError(f"NFTSG_LAYOUT={raw!r}: expected 'flat' or 'v4'")
