"""The benchmark's smoke mode runs end to end, so the benchmark never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from nftsg.agent import netns

CONFIGS = ("none", "conntrack", "linear", "nftsg")


def test_smoke_mode_writes_every_section_with_sane_values(tmp_path: Path, run_prefix: str) -> None:
    out = tmp_path / "bench.json"
    prefix = f"{run_prefix}b"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--json", str(out),
         "--prefix", prefix],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| N | R |" in proc.stdout  # the table was printed
    assert not [n for n in netns.list_namespaces() if n.startswith(prefix)]
    result = json.loads(out.read_text())
    assert result["command"].startswith("bench/run.py --smoke") and result["date"]
    assert result["matrix"]["loopback_conn_per_s"]["median"] > 0
    points = result["matrix"]["points"]
    assert [(p["enis"], p["rules_per_eni"]) for p in points] == [(2, 5), (3, 5)]
    for p in points:
        for port in ("5001", "5201"):
            assert p["probed_flow"][port]["verdict"] == "accept"
            assert p["probed_flow"][port]["ingress_rule_priority"] == 100
        for config in CONFIGS:
            for metric in ("conn_per_s", "throughput_bps"):
                s = p["configs"][config][metric]
                assert s["median"] > 0 and s["min"] <= s["median"] <= s["max"]
                assert s["ratio"] > 0 and s["ratio_min"] <= s["ratio"] <= s["ratio_max"]
        assert p["configs"]["none"]["conn_per_s"]["ratio"] == 1.0
        assert p["nftsg_vs_conntrack_conn"] > 0 and p["nftsg_vs_linear_conn"] > 0
    (cold,) = result["cold_load"]
    assert cold["total_rules"] == 15 and cold["nft_commands"] > 0
    assert 0 < cold["cold_load_s"] and 0 < cold["peak_rss_mb"] < 1000
    assert cold["one_rule_change_commands"] > 0
    assert result["targets"] and all("met" in t for t in result["targets"])
