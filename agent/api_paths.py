"""Where the ECS API lives: listen address, unix socket and key file.

Kept apart from api_server.py so the command line finds the socket without
importing the HTTP server.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api_keys import KEYS_FILE_NAME

DEFAULT_LISTEN = "127.0.0.1:7380"
API_SOCKET_NAME = "api.sock"


def api_listen() -> str:
    """NFTSG_API_LISTEN (HOST:PORT, [V6]:PORT), else 127.0.0.1:7380 (loopback only)."""
    return os.environ.get("NFTSG_API_LISTEN") or DEFAULT_LISTEN


def api_socket_path(state_dir: Path) -> Path:
    """NFTSG_API_SOCKET, else `api.sock` in the state directory."""
    explicit = os.environ.get("NFTSG_API_SOCKET")
    return Path(explicit) if explicit else state_dir / API_SOCKET_NAME


def api_keys_path(state_dir: Path) -> Path:
    return state_dir / KEYS_FILE_NAME
