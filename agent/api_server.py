"""The agent's ECS API over HTTP (docs/api.md; docs/design.md §"HTTP API") and over a unix socket.

Stack: aiohttp's server (llhttp parser, asyncio). It runs in a thread of its
own with its own event loop, so the synchronous daemon only calls start() and
stop(); it serves pre-bound sockets, so bind errors surface in start() and a
unix socket can be made 0600 before it accepts anyone. (Starlette on uvicorn
would need uvicorn's server driven by hand in a thread, with its signal
handling disabled, and an ASGI layer we have no use for.)

Two listeners, one pipeline:
- TCP (default 127.0.0.1:7380): every request must carry an ACS3-HMAC-SHA256
  signature from a key in the KeyStore (api_auth.py).
- unix socket (mode 0600): no signature; the peer's uid (SO_PEERCRED) must be
  root or the agent's own. This is what `nftsg ecs` uses.

After authentication a request's action and version are checked, its RPC
parameters (query string and form body) gathered (api_params.py) and one
ControlPlane.call made on a single worker thread: calls run one at a time in
the order requests arrived, a slow call never blocks the event loop, and a
client going away does not cancel a call already queued. Every rejection
happens before that call, so a rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from nftsg.translators.errors import EcsError

from .api_auth import Acs3Verifier
from .api_errors import http_status
from .api_keys import KeyStore
from .api_params import unflatten
from .api_paths import DEFAULT_LISTEN, api_keys_path, api_listen, api_socket_path
from .api_seam import ACTIONS, API_VERSION, ControlPlane
from .settings import Settings

log = logging.getLogger(__name__)

MAX_PARAMETERS = 10_000
# The SDK puts every parameter in the query string: 100 rules of 10 fields do
# not fit aiohttp's default 8 KiB request line.
_HANDLER_ARGS = {"max_line_size": 512 * 1024, "max_field_size": 16 * 1024}
_JSON = "application/json;charset=utf-8"
_FORM = "application/x-www-form-urlencoded"

Headers = dict[str, list[str]]
Authenticator = Callable[[web.Request, list[tuple[str, str]], Headers, bytes], str]


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _new_request_id() -> str:
    return str(uuid.uuid4()).upper()


def _parse_pairs(text: str, where: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=MAX_PARAMETERS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise EcsError("InvalidParameter", f"The {where} is not valid: {exc}.") from None


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ApiServer:
    def __init__(
        self,
        control_plane: ControlPlane,
        keystore: KeyStore,
        listen: str | None = DEFAULT_LISTEN,
        unix_socket: Path | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.control_plane = control_plane
        self.keystore = keystore
        self.listen = listen
        self.unix_socket = unix_socket
        self.verifier = Acs3Verifier(keystore.secret_for, clock=clock)
        self.allowed_uids = frozenset({0, os.getuid()})
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Bind, then serve in a background thread; raises OSError if a bind fails."""
        sockets: list[tuple[socket.socket, Authenticator]] = []
        try:
            if self.listen:
                host, port = parse_listen(self.listen)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                tcp = socket.create_server((host, port), family=family)
                self.address = tcp.getsockname()[:2]
                sockets.append((tcp, self._authenticate_signature))
            if self.unix_socket is not None:
                sockets.append((self._bind_unix(self.unix_socket), self._authenticate_peer))
        except BaseException:
            for sock, _ in sockets:
                sock.close()
            raise
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nftsg-api-call")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(sockets, ready, failure), name="nftsg-api", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        log.info(
            "ECS API listening on %s%s",
            self.listen or "-",
            f" and {self.unix_socket}" if self.unix_socket else "",
        )

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight, then return."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.unix_socket is not None:
            with_socket = self.unix_socket
            try:
                if stat.S_ISSOCK(with_socket.lstat().st_mode):
                    with_socket.unlink()
            except FileNotFoundError:
                pass
        self._loop = self._thread = self._executor = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _bind_unix(path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # stale, from an agent that died
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Before listen(): nobody can connect while the mode is still wider.
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def _serve(
        self,
        sockets: list[tuple[socket.socket, Authenticator]],
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup(sockets))
        except BaseException as exc:
            failure.append(exc)
            for sock, _ in sockets:
                sock.close()
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            for runner in self._runners:
                loop.run_until_complete(runner.cleanup())
            self._runners = []
            loop.close()

    async def _setup(self, sockets: list[tuple[socket.socket, Authenticator]]) -> None:
        for sock, authenticate in sockets:
            app = web.Application(client_max_size=1024 * 1024, handler_args=_HANDLER_ARGS)
            app.router.add_route("*", "/{tail:.*}", self._handler(authenticate))
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
            await runner.setup()
            self._runners.append(runner)
            await web.SockSite(runner, sock).start()

    # -- authentication -------------------------------------------------------

    def _authenticate_signature(
        self, request: web.Request, query: list[tuple[str, str]], headers: Headers, body: bytes
    ) -> str:
        return self.verifier.verify(request.method, request.rel_url.raw_path, query, headers, body)

    def _authenticate_peer(
        self, request: web.Request, query: list[tuple[str, str]], headers: Headers, body: bytes
    ) -> str:
        uid = _peer_uid(request)
        if uid is None or uid not in self.allowed_uids:
            raise EcsError(
                "Forbidden",
                f"User not authorized: the API socket serves root and uid {os.getuid()} only.",
            )
        return f"uid={uid}"

    # -- one request ----------------------------------------------------------

    def _handler(
        self, authenticate: Authenticator
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            started = time.perf_counter()
            request_id = _new_request_id()
            action = "-"
            principal = "-"
            try:
                if request.method not in ("GET", "POST"):
                    raise EcsError("UnsupportedHTTPMethod", "This http method is not supported.")
                body = await request.read()
                query = _parse_pairs(request.query_string, "query string")
                headers: Headers = {}
                for name, value in request.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                principal = authenticate(request, query, headers, body)
                action, params = self._parse_call(request, query, headers, body)
                loop = asyncio.get_running_loop()
                # shield: a client that goes away must not cancel a queued call.
                result = await asyncio.shield(
                    loop.run_in_executor(
                        self._executor, self.control_plane.call, action, params, request_id
                    )
                )
                if not isinstance(result, dict):
                    raise TypeError(f"control plane returned {type(result).__name__}")
                response = {
                    "RequestId": request_id,
                    **{k: v for k, v in result.items() if k != "RequestId"},
                }
                status, code = 200, "-"
            except EcsError as error:
                status, code = http_status(error.code), error.code
                response = {
                    "RequestId": request_id,
                    "HostId": request.headers.get("Host", ""),
                    "Code": error.code,
                    "Message": error.message,
                }
            except Exception:
                log.exception("ECS API %s failed (RequestId %s)", action, request_id)
                status, code = 500, "InternalError"
                response = {
                    "RequestId": request_id,
                    "HostId": request.headers.get("Host", ""),
                    "Code": code,
                    "Message": "The request processing has failed due to some unknown error.",
                }
            log.info(
                "ECS API %s by %s -> %d %s (%.1f ms, RequestId %s)",
                action,
                principal,
                status,
                code,
                (time.perf_counter() - started) * 1000,
                request_id,
            )
            return web.Response(
                status=status,
                text=json.dumps(response, ensure_ascii=False),
                headers={"Content-Type": _JSON, "x-acs-request-id": request_id},
            )

        return handle

    @staticmethod
    def _parse_call(
        request: web.Request, query: list[tuple[str, str]], headers: Headers, body: bytes
    ) -> tuple[str, dict[str, Any]]:
        pairs = list(query)
        if body:
            content_type = request.content_type
            if content_type != _FORM:
                raise EcsError(
                    "InvalidParameter",
                    f"Content-Type {content_type!r} is not supported: send RPC parameters "
                    "in the query string or as a form.",
                )
            try:
                text = body.decode(request.charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise EcsError("InvalidParameter", "The form body is not valid UTF-8.") from None
            pairs += _parse_pairs(text, "form body")
        if len(pairs) > MAX_PARAMETERS:
            raise EcsError("InvalidParameter", f"More than {MAX_PARAMETERS} parameters.")
        given = dict(pairs)
        action = (headers.get("x-acs-action") or [given.get("Action", "")])[0].strip()
        version = (headers.get("x-acs-version") or [given.get("Version", "")])[0].strip()
        if request.rel_url.raw_path != "/":
            raise EcsError(
                "InvalidAction.NotFound",
                "Specified api is not found, please check your url and method.",
            )
        if not action:
            raise EcsError(
                "MissingParameter",
                'The input parameter "Action" that is mandatory for processing this request '
                "is not supplied.",
            )
        if version != API_VERSION:
            if not version:
                raise EcsError(
                    "MissingParameter",
                    'The input parameter "Version" that is mandatory for processing this request '
                    "is not supplied.",
                )
            raise EcsError(
                "InvalidVersion", f"Specified parameter Version is not valid: {version}."
            )
        if action not in ACTIONS:
            raise EcsError(
                "InvalidAction.NotFound",
                "Specified api is not found, please check your url and method.",
            )
        return action, unflatten(pairs)


def api_server_for(
    settings: Settings, control_plane: ControlPlane, listen: str | None = None
) -> ApiServer:
    """The agent's API: TCP on `listen` (default NFTSG_API_LISTEN or 127.0.0.1:7380),
    the unix socket and the key file of its state directory."""
    return ApiServer(
        control_plane,
        KeyStore(api_keys_path(settings.state_dir)),
        listen=listen or api_listen(),
        unix_socket=api_socket_path(settings.state_dir),
    )
