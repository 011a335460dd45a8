"""The agent's settings file (`/etc/nftsg/agent.yaml`) and its precedence.

Every setting has one name in three places: a key of the file, an environment
variable (``NFTSG_`` + the key in capitals) and an option of `nftsg agent`
(``--`` + the key with dashes). The command line wins over the environment,
the environment over the file, the file over the defaults. The file is
optional at its default path and required when named (``--config`` or
``NFTSG_CONFIG``). A setting that cannot be used is one `SettingsError`
line with a code, naming where it came from; nothing starts with it.

The result is the same `Settings` the rest of the agent reads
(`settings.py`); SIGHUP reads every source again (`reload`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT, check_ct_mark_bit
from nftsg.translators.errors import EcsError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .documents import read_document_file
from .labplan import LabError, check_prefix
from .settings import (
    DEFAULT_AGENT_LAYOUT,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    DEFAULT_TABLE,
    Settings,
    SettingsError,
)

DEFAULT_CONFIG_PATH = Path("/etc/nftsg/agent.yaml")
CONFIG_ENV = "NFTSG_CONFIG"
DEFAULT_API_LISTEN = "127.0.0.1:7380"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9380"

LogLevel = Literal["debug", "info", "warning", "error"]


# The id form validation accepts (docs/dataplane.md "Names").
_GROUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class AgentFile(BaseModel):
    """The keys of the settings file; every one is optional."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path = DEFAULT_STATE_DIR
    prefix: str = DEFAULT_PREFIX
    table: str = Field(DEFAULT_TABLE, pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
    # The ECS HTTP API (read by the control plane); the unix socket lives in
    # the runtime or state directory.
    api_listen: str = DEFAULT_API_LISTEN
    # Prometheus metrics over HTTP; "" turns them off.
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    log_level: LogLevel = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    poll_interval: float = Field(0.05, gt=0, le=60)
    verify_interval: float = Field(5.0, gt=0, le=3600)
    selfcheck_interval: float = Field(60.0, gt=0, le=86400)
    ct_mark_bit: int = DEFAULT_CT_MARK_BIT
    layout: Literal["v4", "flat"] = DEFAULT_AGENT_LAYOUT
    # Per-rule hit counters (flat layout); off by default: more elements to load.
    rule_counters: bool = False
    # Seconds between readings of every router's counters (one table listing each).
    rule_counters_interval: float = Field(10.0, gt=0, le=86400)
    # Denied-flow logs: the security group ids whose ENIs' dropped packets are
    # logged (a list, or comma-separated in the environment); none by default.
    log_denied_groups: list[str] = []
    log_denied_nflog_group: int = Field(2, ge=0, le=65535)
    log_denied_rate: int = Field(10, ge=1, le=100000)
    log_denied_records_rate: float = Field(50.0, gt=0, le=100000)
    log_denied_file: bool = False

    @field_validator("log_denied_groups", mode="before")
    @classmethod
    def _group_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            for v in value:
                if not isinstance(v, str) or not _GROUP_ID.fullmatch(v):
                    raise ValueError(f"{v!r} is not a security group id")
        return value

    @field_validator("api_listen", "metrics_listen")
    @classmethod
    def _address(cls, value: str, info: Any) -> str:
        if value == "" and info.field_name == "metrics_listen":
            return value
        parse_listen(value)
        return value

    @field_validator("ct_mark_bit", mode="before")
    @classmethod
    def _bit(cls, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip(), 0)
            except ValueError:
                raise ValueError("not an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("not an integer")
        return check_ct_mark_bit(value)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        try:
            check_prefix(value)
        except LabError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


KEYS: tuple[str, ...] = tuple(AgentFile.model_fields)


def env_name(key: str) -> str:
    return f"NFTSG_{key.upper()}"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT with a literal address; raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7380 or [::1]:7380)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"{text!r}: only IPv6 addresses go in brackets")
    else:
        try:
            if ipaddress.ip_address(host).version != 4:
                raise ValueError(f"{text!r}: write IPv6 addresses in brackets, [::1]:PORT")
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class Sources:
    """Where settings come from; kept so that SIGHUP reads the same ones again."""

    config: Path
    config_required: bool
    overrides: Mapping[str, Any]  # from the command line, by key


def sources_from(config: str | None, overrides: Mapping[str, Any]) -> Sources:
    explicit = config or os.environ.get(CONFIG_ENV)
    return Sources(
        config=Path(explicit) if explicit else DEFAULT_CONFIG_PATH,
        config_required=bool(explicit),
        overrides={k: v for k, v in overrides.items() if v is not None},
    )


def _read_file(sources: Sources) -> dict[str, Any]:
    path = sources.config
    if not sources.config_required and not path.exists():
        return {}
    try:
        text = read_document_file(str(path))
    except EcsError as exc:
        raise SettingsError(f"InvalidSettings.File: {exc.message}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise SettingsError(f"InvalidSettings.File: {path}{line}: not YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"InvalidSettings.File: {path}: expected a mapping of settings")
    return {str(k): v for k, v in data.items()}


def _check(values: dict[str, Any], origin: Mapping[str, str]) -> AgentFile:
    try:
        return AgentFile.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else "?"
        where = origin.get(key, "?")
        if error["type"] == "extra_forbidden":
            raise SettingsError(
                f"InvalidSettings.UnknownKey: {where}: unknown setting {key!r} "
                f"(known: {', '.join(KEYS)})"
            ) from None
        message = str(error["msg"]).removeprefix("Value error, ")
        raise SettingsError(
            f"InvalidSettings.Value: {where}: {key}={error.get('input')!r}: {message}"
        ) from None


def load(sources: Sources, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults < file < environment < command line. Raises SettingsError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in _read_file(sources).items():
        values[key] = value
        origin[key] = str(sources.config)
    for key in KEYS:
        raw = environ.get(env_name(key))
        if raw is None or (raw.strip() == "" and key != "metrics_listen"):
            continue  # unset; empty means unset too, except "metrics off"
        values[key] = raw
        origin[key] = env_name(key)
    for key, value in sources.overrides.items():
        values[key] = value
        origin[key] = f"--{key.replace('_', '-')}"
    checked = _check(values, origin)
    return Settings(
        state_dir=checked.state_dir,
        prefix=checked.prefix,
        table=checked.table,
        ct_mark_bit=checked.ct_mark_bit,
        api_listen=checked.api_listen,
        metrics_listen=checked.metrics_listen,
        log_level=checked.log_level,
        poll_interval=checked.poll_interval,
        verify_interval=checked.verify_interval,
        selfcheck_interval=checked.selfcheck_interval,
        layout=checked.layout,
        rule_counters=checked.rule_counters,
        rule_counters_interval=checked.rule_counters_interval,
        log_denied_groups=tuple(sorted(set(checked.log_denied_groups))),
        log_denied_nflog_group=checked.log_denied_nflog_group,
        log_denied_rate=checked.log_denied_rate,
        log_denied_records_rate=checked.log_denied_records_rate,
        log_denied_file=checked.log_denied_file,
        config_path=sources.config if sources.config.exists() else None,
    )


def reload(current: Settings, sources: Sources) -> Settings:
    """Settings read again for SIGHUP. The state directory, prefix, table and mark bit
    name the store, the tables and the marks in force: a change of those needs a
    restart, and a reload that asks for one applies nothing."""
    fresh = load(sources)
    kept = {
        "state_dir",
        "prefix",
        "table",
        "ct_mark_bit",
        "rule_counters",
        *(k for k in KEYS if k.startswith("log_denied")),
    }
    changed = sorted(k for k in kept if getattr(fresh, k) != getattr(current, k))
    if changed:
        raise SettingsError(
            f"InvalidSettings.NeedsRestart: {', '.join(changed)} changed; "
            "restart the agent to use them (the other settings were not applied)"
        )
    return fresh


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `nftsg agent` that override the settings file and environment
    (--state-dir, --prefix and --table come with the lab commands' common options)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"settings file (default ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH}, if present)",
    )
    parser.add_argument("--api-listen", metavar="HOST:PORT", help="ECS API address")
    parser.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="Prometheus metrics address; '' for none"
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    parser.add_argument("--poll-interval", metavar="S", help="seconds between rounds")
    parser.add_argument("--verify-interval", metavar="S", help="seconds between drift checks")
    parser.add_argument("--selfcheck-interval", metavar="S", help="seconds between self-checks")
    parser.add_argument("--ct-mark-bit", metavar="BIT", help="conntrack mark bit, e.g. 0x40000000")
    parser.add_argument("--layout", metavar="NAME", help="compiler layout: v4 or flat")
    parser.add_argument(
        "--rule-counters", metavar="BOOL", help="per-rule hit counters in the kernel: true/false"
    )
    parser.add_argument(
        "--rule-counters-interval", metavar="S", help="seconds between readings of the counters"
    )
    parser.add_argument(
        "--log-denied-groups", metavar="IDS", help="security groups whose drops are logged: a,b"
    )
    parser.add_argument("--log-denied-nflog-group", metavar="N", help="NFLOG group (default 2)")
    parser.add_argument(
        "--log-denied-rate", metavar="N", help="logged packets/s per dropping rule (kernel)"
    )
    parser.add_argument(
        "--log-denied-records-rate", metavar="N", help="denied-flow records/s written (agent)"
    )
    parser.add_argument(
        "--log-denied-file", metavar="BOOL", help="also write denied-flows.jsonl: true/false"
    )


def sources_from_args(args: argparse.Namespace) -> Sources:
    overrides = {key: getattr(args, key, None) for key in KEYS}
    return sources_from(getattr(args, "config", None), overrides)
