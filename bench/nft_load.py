"""Load a compiled program as one nft text batch into a fresh namespace, timed.

Shared by the probes that compare two compilations of one model side by side.
"""

from __future__ import annotations

import subprocess
import time
import uuid

from nftsg.translators.nft import Program
from nftsg.translators.nft_text import full_sync_text


def load_seconds(prog: Program, prefix: str) -> float:
    """Wall time of `nft -f` of the program's full-sync text in a new namespace."""
    ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        text, _ = full_sync_text(prog)
        t0 = time.perf_counter()
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True
        )
        return time.perf_counter() - t0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
