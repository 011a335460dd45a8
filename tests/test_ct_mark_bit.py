"""The conntrack mark bit of revoked flows: configured from the environment, refused
when it is not exactly one bit, and threaded to the compiler and the flow judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.reconcile import Reconciler
from nftsg.agent.settings import SettingsError, parse_ct_mark_bit, settings_from_env
from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT
from nftsg.translators.evaluator import Flow
from nftsg.translators.validate import load_network

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "three-tier.yaml"
NFTSG = Path(sys.executable).parent / "nftsg"


def test_unset_or_empty_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NFTSG_CT_MARK_BIT", raising=False)
    assert settings_from_env().ct_mark_bit == DEFAULT_CT_MARK_BIT == 0x40000000
    monkeypatch.setenv("NFTSG_CT_MARK_BIT", " ")
    assert settings_from_env().ct_mark_bit == DEFAULT_CT_MARK_BIT


@pytest.mark.parametrize(
    ("text", "bit"), [("0x10", 0x10), ("0X80000000", 0x80000000), ("1", 1), ("0x0100", 0x100)]
)
def test_one_bit_in_hex_or_decimal(monkeypatch: pytest.MonkeyPatch, text: str, bit: int) -> None:
    monkeypatch.setenv("NFTSG_CT_MARK_BIT", text)
    assert settings_from_env().ct_mark_bit == bit


@pytest.mark.parametrize(
    "text", ["0", "3", "0x30", "-1", "0x100000000", "0xffffffff", "bit", "1.0"]
)
def test_anything_but_one_bit_is_refused(text: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_ct_mark_bit(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"NFTSG_CT_MARK_BIT={text!r}: must be exactly one bit")


def test_the_command_line_reports_a_bad_bit_in_one_line(tmp_path: Path) -> None:
    # `explain` without a FILE reads the agent's settings: the first thing that fails.
    env = {**os.environ, "NFTSG_CT_MARK_BIT": "0x3", "NFTSG_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [str(NFTSG), "explain", "--from", "a", "--to", "b", "--protocol", "ICMP"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "nftsg: NFTSG_CT_MARK_BIT='0x3': must be exactly one bit of the 32-bit conntrack "
        "mark, such as 0x40000000"
    ]
    assert list(tmp_path.iterdir()) == []  # changed nothing


def _revoke_rule(listing: dict[str, Any]) -> list[Any]:
    (rule,) = [
        item["rule"]
        for item in listing["nftables"]
        if "rule" in item and "denies" in item["rule"].get("comment", "")
    ]
    expr: list[Any] = rule["expr"]
    return expr


def test_the_reconciler_compiles_and_judges_flows_with_its_bit() -> None:
    network = load_network(EXAMPLE.read_text())
    backend = FakeBackend(["r-demo"])
    judged: list[tuple[str, int]] = []

    def judge(namespace: str, allowed: Any, bit: int) -> int:
        judged.append((namespace, bit))
        web, db = network.enis["eni-web1"].ipv4[0], network.enis["eni-db1"].ipv4[0]
        # The judge is asked about the model: web never reaches db directly.
        assert allowed(Flow(src_ip=web, dst_ip=db, protocol=6, dport=5432)) is False
        return 0

    reconciler = Reconciler(backend, lambda _vpc: "r-demo", prune_flows=judge, ct_mark_bit=0x100)
    reconciler.sync(network)
    assert judged == [("r-demo", 0x100)]
    listing = backend.list_table("r-demo", "inet", "nftsg")
    assert listing is not None
    assert _revoke_rule(listing)[0] == {
        "match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 0x100]}, "right": 0x100}
    }
    assert json.dumps(listing).count('"mark"') == 1  # no other rule reads the mark


def test_a_reconciler_with_a_bad_bit_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly one bit"):
        Reconciler(FakeBackend(), lambda _vpc: "r", ct_mark_bit=0x6)
