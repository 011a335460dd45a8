"""The `nftsg` command line (docs/design.md §"Command line").

Each subcommand is added by a registrar: a function that adds its parser to
the subparsers and sets `handler` (args -> exit code). Subcommands that live in
other modules add their registrar to `REGISTRARS`, so this file only wires
them. ECS errors and usage errors are printed as one line on stderr,
`nftsg: CODE: message (at path)`, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from nftsg.translators.errors import EcsError
from nftsg.translators.explain import explain
from nftsg.translators.network import Network
from nftsg.translators.validate import load_network

from . import cleanup, ecs_cli, lab_commands, plan_commands, report_command, verify_command
from .documents import read_document_file

EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], int]
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def print_error(error: EcsError) -> None:
    """One line: the ECS code, the message and where in the input it was found."""
    where = f" (at {error.path})" if error.path else ""
    message = " ".join(str(error.message).split())
    print(f"nftsg: {error.code}: {message}{where}", file=sys.stderr)


def load_network_file(path: str) -> Network:
    """Read and check a topology file; unreadable files are errors like any other."""
    return load_network(read_document_file(path), source=path)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with a code (subcommand parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        code = "MissingParameter" if "required" in message else "InvalidParameter"
        self.exit(EXIT_ERROR, f"nftsg: {code}: {message} (see {self.prog} --help)\n")


def _running_state_network() -> Network:
    """The running agent's current model (explain without FILE), from its state store."""
    from .lab_commands import stored_network
    from .settings import settings_from_env
    from .store import Store

    settings = settings_from_env()
    loaded = None
    if settings.db_path.exists():
        store = Store(settings.db_path)
        try:
            loaded = stored_network(store)
        finally:
            store.close()
    if loaded is None:
        raise EcsError(
            "AgentNotRunning",
            f"no topology FILE given and no stored state in {settings.state_dir}; "
            "pass a FILE or start a lab (nftsg lab up FILE)",
        )
    return loaded[1]


# -- explain ------------------------------------------------------------------


def run_explain(args: argparse.Namespace) -> int:
    network = load_network_file(args.file) if args.file else _running_state_network()
    result: dict[str, Any] = explain(
        network,
        args.src,
        args.dst,
        args.protocol,
        port=args.port,
        source_port=args.source_port,
        family=args.family,
    )
    print(json.dumps(result, indent=2))
    return 0


def register_explain(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="the reference evaluator's verdict for one new flow, as JSON",
        description=(
            "Explain the verdict for one new flow: the intra-group shortcut, or the "
            "sender's egress and the receiver's ingress with the deciding rule or default. "
            "Needs no root."
        ),
    )
    parser.add_argument(
        "file", nargs="?", metavar="FILE", help="topology file; default: the running agent's state"
    )
    parser.add_argument(
        "--from",
        dest="src",
        required=True,
        metavar="SRC",
        help="instance id (its primary ENI), ENI id, external host name or IP address",
    )
    parser.add_argument("--to", dest="dst", required=True, metavar="DST", help="same as --from")
    parser.add_argument(
        "--protocol",
        required=True,
        metavar="PROTO",
        help="TCP, UDP, ICMP, ICMPv6, GRE, ALL (a protocol only ALL rules match) or a number",
    )
    parser.add_argument("--port", type=int, metavar="N", help="destination port (TCP/UDP)")
    parser.add_argument(
        "--source-port",
        type=int,
        metavar="N",
        help="source port (TCP/UDP); default 0, which no source port range matches",
    )
    parser.add_argument(
        "--family",
        choices=("ipv4", "ipv6"),
        type=str.lower,
        help="address family of named endpoints; default: an IP literal's, else ipv4",
    )
    parser.set_defaults(handler=run_explain)


# Subcommand name -> registrar. Other modules' subcommands (lab, agent, ecs,
# api-key) are added here.
REGISTRARS: dict[str, Registrar] = {
    "explain": register_explain,
    "lab": lab_commands.register,  # also adds `agent`
    "verify": verify_command.register,
    "ecs": ecs_cli.register_ecs,
    "api-key": ecs_cli.register_api_key,
    "cleanup": cleanup.register,
    "plan": plan_commands.register,  # also adds `apply` and `clone`
    "report": report_command.register,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nftsg",
        description="Alibaba Cloud ECS security groups enforced with nftables",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS.values():
        register(subparsers)  # type: ignore[arg-type]  # _Parser is an ArgumentParser
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EcsError as error:
        print_error(error)
        return EXIT_ERROR
    except lab_commands.OPERATOR_ERRORS as error:
        print(f"nftsg: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
