"""Hostile and broken input documents: one line with a code, a non-zero exit, nothing
changed, and bounded time and memory (the CLI runs in a child with an address-space
limit and a timeout)."""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nftsg.translators.errors import EcsError
from nftsg.translators.model import DocumentLimits, parse_document, parse_topology_text
from nftsg.translators.validate import build_network, load_network

ROOT = Path(__file__).resolve().parent.parent
DEMO = (ROOT / "examples" / "three-tier.yaml").read_text()
NFTSG = [sys.executable, "-c", "from nftsg.agent.cli import main; raise SystemExit(main())"]
MEMORY = 1 << 30  # the CLI must do with 1 GiB of address space whatever the input


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NFTSG_STATE_DIR": "/nonexistent-nftsg-state"}
    return subprocess.run(
        [*NFTSG, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,
        env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nftsg: {code}"), lines[0]


def explain(path: Path | str) -> subprocess.CompletedProcess[str]:
    return run_cli("explain", str(path), "--from", "i-web1", "--to", "i-app1", "--protocol", "tcp")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    assert_one_line_error(explain(path), "InvalidParameter.TooManyValues")


@pytest.mark.parametrize("depth", [100, 1000, 100000])
def test_deep_json_is_refused(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"vpcs": ' + "[" * depth + "]" * depth + "}")
    assert_one_line_error(explain(path), "InvalidParameter")


@pytest.mark.parametrize("depth", [100, 1000, 20000])
def test_deep_yaml_is_refused(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("vpcs: " + "[" * depth + "]" * depth + "\n")
    assert_one_line_error(explain(path), "InvalidParameter")


def test_endless_and_special_files_are_refused(tmp_path: Path) -> None:
    assert_one_line_error(explain("/dev/zero"), "InvalidParameter.File")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(explain(fifo), "InvalidParameter.File")  # does not block
    assert_one_line_error(explain(tmp_path / "missing.yaml"), "InvalidParameter.File")


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate((32 << 20) + 1)  # sparse: costs no disk
    assert_one_line_error(explain(path), "InvalidParameter.TooLarge")


def test_limits_apply_to_any_document_text() -> None:
    tight = DocumentLimits(max_bytes=1000, max_depth=3, max_nodes=50)
    with pytest.raises(EcsError) as info:
        parse_document("x" * 1001, limits=tight)
    assert info.value.code == "InvalidParameter.TooLarge"
    with pytest.raises(EcsError) as info:
        parse_document("a: [[[[1]]]]", limits=tight)
    assert info.value.code == "InvalidParameter.TooDeep"
    with pytest.raises(EcsError) as info:
        parse_document("[" + ",".join("1" for _ in range(60)) + "]", limits=tight)
    assert info.value.code == "InvalidParameter.TooManyValues"


def demo() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEMO)
    return data


def _address_fields(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    out = []
    for inst in doc["instances"]:
        out.append((f"instance {inst['instance_id']}", inst, "private_ip_address"))
        if "ipv6_address" in inst:
            out.append((f"instance {inst['instance_id']} v6", inst, "ipv6_address"))
    for ext in doc.get("external_hosts", []):
        out.append((f"external {ext['name']}", ext, "ip_address"))
    for group in doc["security_groups"]:
        for perm in group.get("permissions", []):
            for key in ("source_cidr_ip", "ipv6_source_cidr_ip", "dest_cidr_ip"):
                if key in perm:
                    out.append((f"{group['security_group_id']} {key}", perm, key))
    for pl in doc.get("prefix_lists", []):
        out.append((pl["prefix_list_id"], pl, "entries"))
    return out


def test_zone_ids_are_refused_in_every_address_field() -> None:
    base = demo()
    fields = _address_fields(base)
    assert len(fields) >= 6
    for n, (label, _obj, key) in enumerate(fields):
        doc = copy.deepcopy(base)
        target = _address_fields(doc)[n][1]
        value = target[key]
        if isinstance(value, list):
            target[key] = [value[0] + "%eth0", *value[1:]]
        else:
            target[key] = (
                value.split("/")[0] + "%eth0" + ("/" + value.split("/")[1] if "/" in value else "")
            )
        with pytest.raises(EcsError) as info:
            build_network(parse_topology_text(yaml.safe_dump(doc)))
        assert "%eth0" in info.value.message, (label, info.value)


def test_duplicate_addresses_are_compared_as_addresses() -> None:
    doc = demo()
    v6 = [i for i in doc["instances"] if "ipv6_address" in i]
    assert len(v6) >= 2
    a = v6[0]["ipv6_address"]
    head, _, last = a.rpartition(":")
    v6[1]["ipv6_address"] = head.replace("2001:db8", "2001:0db8") + ":" + last.zfill(4)
    with pytest.raises(EcsError) as info:
        build_network(parse_topology_text(yaml.safe_dump(doc)))
    assert info.value.code == "InvalidPrivateIpAddress.Duplicated"


def test_errors_are_one_line_with_the_code(tmp_path: Path) -> None:
    doc = demo()
    doc["instances"][0]["security_group_ids"] = ["sg-missing"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = explain(path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "InvalidSecurityGroupId.NotFound")
    assert "(at " in proc.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["explain", "x.yaml"], "MissingParameter"),
        (
            ["explain", "x.yaml", "--from", "a", "--to", "b", "--protocol", "tcp", "--port", "x"],
            "InvalidParameter",
        ),
        (["no-such-command"], "InvalidParameter"),
        (["lab", "up"], "MissingParameter"),
    ],
)
def test_bad_command_line_is_one_line_with_a_code(args: list[str], code: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert_one_line_error(proc, code)


def test_help_still_works() -> None:
    proc = run_cli("explain", "--help")
    assert proc.returncode == 0 and "--protocol" in proc.stdout


def test_lab_up_with_a_hostile_file_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    state = tmp_path / "state"
    proc = run_cli("lab", "up", str(path), "--state-dir", str(state), "--prefix", "hostile")
    assert_one_line_error(proc, "InvalidParameter.TooManyValues")
    assert not state.exists()


# -- property: mutated documents never escape as anything but an EcsError -------------

MUTATION = settings(
    max_examples=150,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@MUTATION
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(DEMO) - 1),
            st.integers(min_value=0, max_value=40),
            st.text(alphabet="[]{}:&*!|>-'\"%,\n #0123456789abcxyz.\\/", max_size=12),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_documents_fail_only_with_ecs_errors(
    edits: list[tuple[int, int, str]],
) -> None:
    text = DEMO
    for at, cut, insert in edits:
        at = min(at, len(text))
        text = text[:at] + insert + text[at + cut :]
    try:
        load_network(text, source="mutated.yaml")
    except EcsError as exc:
        assert exc.code and "\n" not in exc.code


@MUTATION
@given(st.integers(min_value=1, max_value=300), st.sampled_from(["[", "{a: ", "- "]))
def test_nesting_never_recurses_out(depth: int, opener: str) -> None:
    closer = {"[": "]", "{a: ": "}", "- ": ""}[opener]
    text = "vpcs: " + opener * depth + "1" + closer * depth
    try:
        parse_document(text, limits=DocumentLimits(max_depth=64))
    except EcsError as exc:
        assert exc.code.startswith("InvalidParameter")
