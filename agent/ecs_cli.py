"""`nftsg ecs ACTION --Param value ...` and `nftsg api-key create|list|delete`.

The commands of docs/design.md §"Command line"; the API they talk to is docs/api.md.

`nftsg ecs` talks to the running agent over its unix socket (no signature:
the socket is 0600 and the agent checks the caller's uid), sends the
parameters with their ECS names as a form, and prints the JSON response. On
an ECS error it prints one line, `Code: Message (RequestId ...)`, and exits 2.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from nftsg.translators.errors import EcsError

from .api_keys import KeyStore
from .api_paths import api_keys_path, api_socket_path
from .api_seam import API_VERSION
from .settings import settings_from_env

EXIT_ERROR = 2


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def parse_ecs_params(words: list[str]) -> list[tuple[str, str]]:
    """`--Name value` / `--Name=value` pairs, names as ECS spells them."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise EcsError("InvalidParameter", f"expected --ParameterName, got {word!r}")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if i + 1 >= len(words):
                raise EcsError("MissingParameter", f"--{name} needs a value")
            value = words[i + 1]
            i += 1
        pairs.append((name, value))
        i += 1
    return pairs


def call_agent(
    path: Path, action: str, pairs: list[tuple[str, str]], timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    """One ECS call over the agent's unix socket: (HTTP status, JSON body)."""
    connection = _UnixHTTPConnection(path, timeout)
    try:
        connection.request(
            "POST",
            "/",
            body=urlencode(pairs).encode("utf-8"),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "x-acs-action": action,
                "x-acs-version": API_VERSION,
                "Accept": "application/json",
            },
        )
        response = connection.getresponse()
        status, raw = response.status, response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        raise EcsError(
            "AgentNotRunning", f"no agent is listening on {path} (start one: nftsg agent)"
        ) from None
    except PermissionError:
        raise EcsError("Forbidden", f"{path}: permission denied (run as root)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise EcsError("ServiceUnavailable", f"the agent at {path} did not answer: {exc}") from None
    finally:
        connection.close()
    try:
        body = json.loads(raw)
    except ValueError:
        raise EcsError("InternalError", f"the agent answered HTTP {status} without JSON") from None
    return status, body


def run_ecs(args: argparse.Namespace) -> int:
    try:
        pairs = parse_ecs_params(args.params)
        path = (
            Path(args.api_socket)
            if args.api_socket
            else api_socket_path(settings_from_env().state_dir)
        )
        status, body = call_agent(path, args.action, pairs)
    except EcsError as error:
        print(f"{error.code}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    if status != 200:
        print(
            f"{body.get('Code', 'InternalError')}: {body.get('Message', '')} "
            f"(RequestId {body.get('RequestId', '-')})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0


def register_ecs(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ecs",
        help="call one ECS API action on the running agent",
        description=(
            "Call one ECS API action (2014-05-26) on the running agent, with ECS's parameter "
            "names: nftsg ecs AuthorizeSecurityGroup --SecurityGroupId sg-web "
            "--Permissions.1.IpProtocol TCP --Permissions.1.PortRange 22/22 "
            "--Permissions.1.SourceCidrIp 198.51.100.0/24"
        ),
    )
    parser.add_argument(
        "--api-socket",
        metavar="PATH",
        help="the agent's API socket; default $NFTSG_API_SOCKET or api.sock in the state dir",
    )
    parser.add_argument("action", metavar="ACTION", help="ECS action, e.g. DescribeSecurityGroups")
    parser.add_argument(
        "params", nargs=argparse.REMAINDER, metavar="--Param value", help="ECS parameters"
    )
    parser.set_defaults(handler=run_ecs)


# -- api-key -----------------------------------------------------------------


def _keystore() -> KeyStore:
    return KeyStore(api_keys_path(settings_from_env().state_dir))


def run_api_key(args: argparse.Namespace) -> int:
    store = _keystore()
    if args.key_command == "create":
        key = store.create()
        print(
            json.dumps({"AccessKeyId": key.access_key_id, "AccessKeySecret": key.access_key_secret})
        )
    elif args.key_command == "list":
        listed = [
            {"AccessKeyId": k.access_key_id, "CreateTime": k.create_time} for k in store.list()
        ]
        print(json.dumps({"AccessKeys": listed}, indent=2))
    else:
        store.delete(args.access_key_id)  # EcsError -> cli.main prints it, exit 2
    return 0


def register_api_key(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "api-key",
        help="manage the AccessKey pairs of the HTTP API",
        description="AccessKey pairs for the agent's HTTP API (ACS3-HMAC-SHA256), kept 0600 "
        "in the state directory; list never shows secrets.",
    )
    keys = parser.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    keys.add_parser(
        "create", help='print a new pair as {"AccessKeyId": ..., "AccessKeySecret": ...}'
    )
    keys.add_parser("list", help="list AccessKeyIds (no secrets)")
    delete = keys.add_parser("delete", help="delete one key; it stops working at once")
    delete.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
    parser.set_defaults(handler=run_api_key)
