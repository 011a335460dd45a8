"""The agent's settings: file < environment < command line, one-line coded errors,
and what SIGHUP may change. No root: only parsing (agent_settings.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nftsg.agent import agent_settings
from nftsg.agent.settings import SettingsError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load(
    config: Path | None, env: dict[str, str] | None = None, **overrides: object
) -> agent_settings.Settings:
    sources = agent_settings.sources_from(str(config) if config else None, overrides)
    return agent_settings.load(sources, env or {})


def test_defaults_without_a_file(tmp_path: Path) -> None:
    sources = agent_settings.Sources(tmp_path / "absent.yaml", False, {})
    settings = agent_settings.load(sources, {})
    assert settings.state_dir == Path("/var/lib/nftsg")
    assert settings.api_listen == "127.0.0.1:7380"
    assert settings.metrics_listen == "127.0.0.1:9380"
    assert (settings.poll_interval, settings.verify_interval, settings.selfcheck_interval) == (
        0.05,
        5.0,
        60.0,
    )
    assert settings.ct_mark_bit == 0x40000000
    assert settings.layout == "flat"
    assert settings.config_path is None


def test_precedence_command_line_env_file(tmp_path: Path) -> None:
    config = write(
        tmp_path / "agent.yaml",
        "state_dir: /srv/nftsg\nlog_level: debug\nverify_interval: 2\n"
        "api_listen: 127.0.0.1:7000\nct_mark_bit: 0x100\nlayout: flat\n",
    )
    from_file = load(config)
    assert from_file.state_dir == Path("/srv/nftsg")
    assert (from_file.log_level, from_file.verify_interval) == ("debug", 2.0)
    assert (from_file.ct_mark_bit, from_file.layout) == (0x100, "flat")
    assert from_file.config_path == config

    env = {"NFTSG_VERIFY_INTERVAL": "3", "NFTSG_API_LISTEN": "[::1]:7001"}
    from_env = load(config, env)
    assert (from_env.verify_interval, from_env.api_listen) == (3.0, "[::1]:7001")
    assert from_env.log_level == "debug"  # still the file's

    cli = load(config, env, verify_interval="4", log_level="WARNING")
    assert (cli.verify_interval, cli.log_level, cli.api_listen) == (4.0, "warning", "[::1]:7001")


def test_config_path_from_env_and_empty_metrics_means_off(tmp_path: Path) -> None:
    config = write(tmp_path / "a.yaml", "metrics_listen: 127.0.0.1:9999\n")
    sources = agent_settings.sources_from(None, {})
    assert sources.config == Path("/etc/nftsg/agent.yaml") and not sources.config_required
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NFTSG_CONFIG", str(config))
        sources = agent_settings.sources_from(None, {})
    assert sources.config == config and sources.config_required
    assert agent_settings.load(sources, {}).metrics_listen == "127.0.0.1:9999"
    assert agent_settings.load(sources, {"NFTSG_METRICS_LISTEN": ""}).metrics_listen == ""
    # Empty means unset for the others.
    assert agent_settings.load(sources, {"NFTSG_LOG_LEVEL": ""}).log_level == "info"


@pytest.mark.parametrize(
    ("text", "env", "code", "words"),
    [
        ("poll_interval: 0\n", {}, "InvalidSettings.Value", ["poll_interval", "greater than 0"]),
        ("verify_interval: often\n", {}, "InvalidSettings.Value", ["verify_interval"]),
        ("ct_mark_bit: 3\n", {}, "InvalidSettings.Value", ["exactly one bit"]),
        ("api_listen: localhost:80\n", {}, "InvalidSettings.Value", ["api_listen"]),
        ("metrics_listen: 127.0.0.1:99999\n", {}, "InvalidSettings.Value", ["HOST:PORT"]),
        ("prefix: a-b\n", {}, "InvalidSettings.Value", ["no '-'"]),
        ("state_dir: relative/dir\n", {}, "InvalidSettings.Value", ["absolute"]),
        ("log_level: loud\n", {}, "InvalidSettings.Value", ["log_level"]),
        ("layout: v9\n", {}, "InvalidSettings.Value", ["layout"]),
        ("listen: 127.0.0.1:1\n", {}, "InvalidSettings.UnknownKey", ["'listen'", "known:"]),
        ("- a list\n", {}, "InvalidSettings.File", ["mapping"]),
        ("a: [unclosed\n", {}, "InvalidSettings.File", ["not YAML", "line"]),
        ("", {"NFTSG_POLL_INTERVAL": "-1"}, "InvalidSettings.Value", ["NFTSG_POLL_INTERVAL"]),
    ],
)
def test_bad_settings_are_one_line_with_a_code(
    tmp_path: Path, text: str, env: dict[str, str], code: str, words: list[str]
) -> None:
    config = write(tmp_path / "agent.yaml", text)
    with pytest.raises(SettingsError) as caught:
        load(config, env)
    message = str(caught.value)
    assert message.startswith(code + ": ")
    assert "\n" not in message
    for word in words:
        assert word in message
    if not env:
        assert str(config) in message  # says where the bad setting came from


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^InvalidSettings.File: cannot read .*absent"):
        load(tmp_path / "absent.yaml")


def test_reload_keeps_what_needs_a_restart(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.yaml", "verify_interval: 2\n")
    sources = agent_settings.sources_from(str(config), {})
    current = agent_settings.load(sources, {})
    config.write_text("verify_interval: 7\nlog_level: debug\n")
    fresh = agent_settings.reload(current, sources)
    assert (fresh.verify_interval, fresh.log_level) == (7.0, "debug")
    config.write_text("table: other\n")
    with pytest.raises(SettingsError, match=r"^InvalidSettings.NeedsRestart: table"):
        agent_settings.reload(current, sources)


def test_nftsg_agent_exits_2_with_the_error_before_anything_else(tmp_path: Path) -> None:
    config = write(tmp_path / "agent.yaml", "selfcheck_interval: -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "nftsg.agent.cli", "agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nftsg: InvalidSettings.Value: ")
    assert "selfcheck_interval" in lines[0]


def test_denied_flow_log_settings(tmp_path: Path) -> None:
    assert load(None).log_denied_groups == ()  # off by default: no log rule anywhere
    config = write(
        tmp_path / "agent.yaml",
        "log_denied_groups: [sg-web, sg-db]\nlog_denied_rate: 3\nlog_denied_file: true\n",
    )
    got = load(config)
    assert (got.log_denied_groups, got.log_denied_rate, got.log_denied_file) == (
        ("sg-db", "sg-web"),
        3,
        True,
    )
    assert got.log_denied_nflog_group == 2
    env = load(None, {"NFTSG_LOG_DENIED_GROUPS": "sg-a, sg-b,sg-a"})
    assert env.log_denied_groups == ("sg-a", "sg-b")
    with pytest.raises(SettingsError, match=r"^InvalidSettings.Value: .*log_denied_groups"):
        load(None, {"NFTSG_LOG_DENIED_GROUPS": "sg a"})
    with pytest.raises(SettingsError, match=r"^InvalidSettings.Value: .*log_denied_nflog_group"):
        load(None, {"NFTSG_LOG_DENIED_NFLOG_GROUP": "70000"})
    # Changing the logged groups changes the programs: a restart, like rule_counters.
    sources = agent_settings.sources_from(str(config), {})
    current = agent_settings.load(sources, {})
    config.write_text("log_denied_groups: [sg-web]\n")
    with pytest.raises(SettingsError, match=r"NeedsRestart: .*log_denied_groups"):
        agent_settings.reload(current, sources)
