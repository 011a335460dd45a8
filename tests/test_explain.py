"""`nftsg explain`: the console script on the demo topology, and name resolution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nftsg.translators.errors import EcsError
from nftsg.translators.explain import explain
from nftsg.translators.network import Network
from nftsg.translators.validate import load_network

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "three-tier.yaml"
# The console script installed beside the interpreter running the tests.
NFTSG = Path(sys.executable).parent / "nftsg"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NFTSG), "explain", *args], capture_output=True, text=True, timeout=60, check=False
    )


def explain_cli(*args: str) -> dict[str, Any]:
    done = run(str(EXAMPLE), *args)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def demo() -> Network:
    return load_network(EXAMPLE.read_text(encoding="utf-8"))


# -- the console script --------------------------------------------------------------------


def test_cli_accept_by_an_ingress_rule_from_an_external_host() -> None:
    result = explain_cli("--from", "office", "--to", "i-web1", "--protocol", "TCP", "--port", "80")
    assert (result["verdict"], result["reason"]) == ("accept", "rules")
    assert result["egress"] is None  # the office is not an ENI
    ingress = result["ingress"]
    assert (ingress["eni"], ingress["verdict"], ingress["by"]) == ("eni-web1", "accept", "rule")
    assert ingress["rule"]["group_id"] == "sg-web"
    assert ingress["rule"]["port_range"] == "80/80"
    assert ingress["rule"]["priority"] == 10
    assert result["flow"]["src_ip"] == "198.51.100.7"
    assert result["flow"]["dst_ip"] == "10.0.1.10"
    assert result["summary"].startswith("accept")


def test_cli_intra_group_shortcut() -> None:
    result = explain_cli("--from", "i-web1", "--to", "i-web2", "--protocol", "tcp", "--port", "9")
    assert (result["verdict"], result["reason"], result["shortcut_group"]) == (
        "accept",
        "intra-group",
        "sg-web",
    )
    assert result["egress"] is None and result["ingress"] is None
    assert "sg-web" in result["summary"]


def test_cli_drop_by_a_lower_priority_drop_rule() -> None:
    result = explain_cli(
        "--from", "internet", "--to", "i-bastion", "--protocol", "TCP", "--port", "22"
    )
    assert result["verdict"] == "drop"
    rule = result["ingress"]["rule"]
    assert (rule["group_id"], rule["policy"], rule["priority"]) == ("sg-bastion", "drop", 2)
    assert result["summary"].startswith("drop")


def test_cli_drop_by_the_senders_egress() -> None:
    result = explain_cli("--from", "i-db1", "--to", "i-app1", "--protocol", "TCP", "--port", "8080")
    assert result["verdict"] == "drop"
    egress = result["egress"]
    assert (egress["eni"], egress["verdict"], egress["by"]) == ("eni-db1", "drop", "rule")
    assert egress["rule"]["description"] == "db never calls out"


def test_cli_group_reference_and_default_drop() -> None:
    allowed = explain_cli("--from", "i-app1", "--to", "i-db1", "--protocol", "TCP", "--port=5432")
    assert allowed["verdict"] == "accept"
    assert allowed["ingress"]["rule"]["peer"] == "sg-app"
    assert allowed["egress"]["by"] == "default"

    denied = explain_cli("--from", "i-web1", "--to", "i-db1", "--protocol", "TCP", "--port=5432")
    assert denied["verdict"] == "drop"
    assert (denied["ingress"]["by"], denied["ingress"]["rule"]) == ("default", None)
    assert denied["ingress"]["default"] == "drop"


def test_cli_ipv6_family() -> None:
    result = explain_cli(
        "--from", "internet", "--to", "i-web1", "--protocol", "TCP", "--port", "80",
        "--family", "ipv6",
    )  # fmt: skip
    assert result["verdict"] == "accept"
    assert result["flow"]["family"] == "ipv6"
    assert result["flow"]["dst_ip"] == "2001:db8:10:1::10"
    assert result["ingress"]["rule"]["peer"] == "::/0"


def one_line_error(stderr: str) -> dict[str, str]:
    """`nftsg: CODE: message (at path)` -> its parts; errors are exactly one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    prefix, code, message = lines[0].split(": ", 2)
    assert prefix == "nftsg"
    return {"Code": code, "Message": message}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--from", "i-nope", "--to", "i-web1", "--protocol=ICMP"), "InvalidInstanceId.NotFound"),
        (("--from", "office", "--to", "i-web1", "--protocol", "TCP"), "MissingParameter.Port"),
        (
            ("--from", "office", "--to", "i-db1", "--protocol", "ICMPv6", "--family", "ipv6"),
            "InvalidParameter",
        ),
        (("--from", "office", "--to", "i-web1", "--protocol", "SCTPX"), "InvalidIpProtocol"),
    ],
)
def test_cli_errors_exit_non_zero_with_the_ecs_code(args: tuple[str, ...], code: str) -> None:
    done = run(str(EXAMPLE), *args)
    assert done.returncode == 2
    assert done.stdout == ""
    error = one_line_error(done.stderr)
    assert error["Code"].startswith(code)
    assert error["Message"]


def test_cli_unreadable_or_invalid_file_and_missing_file_argument(tmp_path: Path) -> None:
    missing = run(str(tmp_path / "absent.yaml"), "--from", "a", "--to", "b", "--protocol", "ICMP")
    assert missing.returncode == 2
    assert "absent.yaml" in one_line_error(missing.stderr)["Message"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("vpcs:\n  - vpc_id: vpc-x\n    cidr_block: not-a-cidr\n", encoding="utf-8")
    invalid = run(str(broken), "--from", "a", "--to", "b", "--protocol", "ICMP")
    assert invalid.returncode == 2
    assert one_line_error(invalid.stderr)["Code"] == "InvalidCidrBlock.Malformed"

    no_file = run("--from", "i-web1", "--to", "i-web2", "--protocol", "ICMP")
    assert no_file.returncode == 2
    assert one_line_error(no_file.stderr)["Code"] == "AgentNotRunning"


# -- name resolution (in process) --------------------------------------------------------------


def test_instance_id_resolves_to_its_primary_eni(demo: Network) -> None:
    result = explain(demo, "i-app1", "i-db1", "TCP", port=5432)
    assert result["from"]["kind"] == "instance"
    assert (result["from"]["eni"], result["from"]["address"]) == ("eni-app1", "10.0.2.10")
    assert result["to"]["instance"] == "i-db1"


def test_eni_id_external_name_and_ip_literal(demo: Network) -> None:
    by_eni = explain(demo, "eni-web1", "10.0.2.10", "tcp", port=8080)
    assert (by_eni["from"]["kind"], by_eni["from"]["eni"]) == ("eni", "eni-web1")
    # An IP literal is matched to its owner by the evaluator.
    assert (by_eni["to"]["kind"], by_eni["to"]["eni"]) == ("address", "eni-app1")
    assert by_eni["verdict"] == "accept"

    by_external = explain(demo, "office", "i-bastion", "Tcp", port=22)
    assert (by_external["from"]["kind"], by_external["from"]["external"]) == ("external", "office")
    assert by_external["verdict"] == "accept"

    outside = explain(demo, "192.0.2.99", "i-web1", "TCP", port=443)
    assert (outside["from"]["eni"], outside["from"]["external"]) == (None, None)
    assert outside["verdict"] == "accept"


def test_family_from_flag_or_ip_literal(demo: Network) -> None:
    v6 = explain(demo, "i-web1", "i-app1", "TCP", port=8080, family="ipv6")
    assert v6["flow"]["src_ip"] == "2001:db8:10:1::10"
    assert v6["flow"]["dst_ip"] == "2001:db8:10:2::10"
    inferred = explain(demo, "2001:db8:ffff::50", "i-web2", "TCP", port=80)
    assert inferred["flow"]["family"] == "ipv6"
    assert inferred["to"]["address"] == "2001:db8:10:1::11"
    with pytest.raises(EcsError) as mixed:
        explain(demo, "2001:db8:ffff::50", "i-web2", "TCP", port=80, family="ipv4")
    assert mixed.value.code == "InvalidParameter"
    with pytest.raises(EcsError) as no_v6:
        explain(demo, "i-bastion", "i-web1", "TCP", port=22, family="ipv6")
    assert no_v6.value.path == "from"


def test_protocol_names_and_numbers(demo: Network) -> None:
    gre = explain(demo, "office", "i-web1", "47")
    assert (gre["flow"]["protocol"], gre["verdict"]) == ("GRE", "drop")
    icmp = explain(demo, "office", "i-web1", "icmp")
    assert (icmp["flow"]["protocol_number"], icmp["verdict"]) == (1, "accept")
    every = explain(demo, "i-db1", "internet", "ALL")
    assert every["verdict"] == "drop"
    assert every["egress"]["rule"]["ip_protocol"] == "ALL"
    with pytest.raises(EcsError) as icmp_v6:
        explain(demo, "office", "i-web1", "ICMP", family="ipv6")
    assert icmp_v6.value.code == "InvalidParam.Ipv4ProtocolConflictWithIpv6Address"
    with pytest.raises(EcsError) as port_on_icmp:
        explain(demo, "office", "i-web1", "ICMP", port=7)
    assert port_on_icmp.value.code == "InvalidParameter.Port"
    with pytest.raises(EcsError) as bad_port:
        explain(demo, "office", "i-web1", "UDP", port=70000)
    assert bad_port.value.code == "InvalidParameter.Port"
