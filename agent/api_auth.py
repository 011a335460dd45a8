"""ACS3-HMAC-SHA256 verification, exactly as Alibaba Cloud's SDK signs RPC calls.

What `alibabacloud-tea-openapi` (the ECS SDK's base) signs, per request:

    CanonicalRequest = METHOD \n PATH \n CanonicalQuery \n CanonicalHeaders \n
                       SignedHeaders \n HexSHA256(body)
    StringToSign     = "ACS3-HMAC-SHA256" \n HexSHA256(CanonicalRequest)
    Signature        = Hex(HMAC-SHA256(AccessKeySecret, StringToSign))
    Authorization: ACS3-HMAC-SHA256 Credential=<AccessKeyId>,
                   SignedHeaders=<h1;h2;...>,Signature=<hex>

- CanonicalQuery: the query parameters sorted by name, `name=value` joined by
  `&`, each percent-encoded as RFC 3986 (only `A-Za-z0-9-_.~` left as is).
  RPC parameters travel in the query string, so they are all signed; a form
  body is covered by the payload hash.
- CanonicalHeaders: every signed header, lower-cased name, `name:value\n`,
  sorted by name, values trimmed (repeated headers joined by `,`, sorted).
  The SDK signs every header it sends: host, x-acs-action, x-acs-version,
  x-acs-date (`yyyy-MM-ddTHH:mm:ssZ`, UTC), x-acs-signature-nonce,
  x-acs-content-sha256 (hex SHA-256 of the body), accept, user-agent, and
  content-type when there is a body.

The verifier requires host, content-type (if present) and every `x-acs-*`
header to be signed, the date within 15 minutes of the agent's clock, the
payload hash to match the body, and each nonce to be used once per key while
its request could still be valid. Failures raise `EcsError` with ECS's codes;
nothing about the secret or the signature is ever put in a message or a log.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from nftsg.translators.errors import EcsError

ALGORITHM = "ACS3-HMAC-SHA256"
CLOCK_SKEW_SECONDS = 15 * 60
MAX_REMEMBERED_NONCES = 1_000_000
_REQUIRED_HEADERS = (
    "host",
    "x-acs-action",
    "x-acs-version",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
)
_AUTHORIZATION = re.compile(
    r"ACS3-HMAC-SHA256 Credential=(?P<ak>[^,\s]+),"
    r"SignedHeaders=(?P<headers>[a-z0-9-]+(?:;[a-z0-9-]+)*),"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)

SecretLookup = Callable[[str], str | None]


def _incomplete(why: str) -> EcsError:
    return EcsError(
        "IncompleteSignature", f"The request signature does not conform to Aliyun standards: {why}."
    )


def percent_encode(text: str) -> str:
    return quote(text, safe="~", encoding="utf-8")


def canonical_query(pairs: Sequence[tuple[str, str]]) -> str:
    encoded = sorted((percent_encode(k), percent_encode(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_headers(headers: Mapping[str, Sequence[str]], signed: Sequence[str]) -> str:
    lines = []
    for name in signed:
        values = sorted(v.strip() for v in headers[name])
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)


def string_to_sign(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, Sequence[str]],
    signed: Sequence[str],
    payload_hash: str,
) -> str:
    canonical_request = "\n".join(
        [
            method,
            path or "/",
            canonical_query(query),
            canonical_headers(headers, signed),
            ";".join(signed),
            payload_hash,
        ]
    )
    return f"{ALGORITHM}\n{hashlib.sha256(canonical_request.encode('utf-8')).hexdigest()}"


def sign(secret: str, to_sign: str) -> str:
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_date(value: str) -> float:
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise EcsError(
            "InvalidTimeStamp.Format",
            "Specified time stamp or date value is not well formatted "
            "(x-acs-date must be yyyy-MM-ddTHH:mm:ssZ, UTC).",
        ) from None
    return parsed.timestamp()


class NonceCache:
    """Nonces seen per AccessKeyId, each kept until its request's date leaves the window."""

    def __init__(self, limit: int = MAX_REMEMBERED_NONCES) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._limit = limit

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, access_key_id: str, nonce: str, until: float, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        key = (access_key_id, nonce)
        if key in self._seen:
            raise EcsError("SignatureNonceUsed", "Specified signature nonce was used already.")
        if len(self._seen) >= self._limit:
            raise EcsError("Throttling", "Request was denied due to request throttling.")
        self._seen.add(key)
        heapq.heappush(self._expiry, (until, key))


class Acs3Verifier:
    """Checks one request's ACS3-HMAC-SHA256 signature; returns the AccessKeyId.

    Not thread-safe: the API server calls it from its event loop only.
    """

    def __init__(self, secret_for: SecretLookup, clock: Callable[[], float] = time.time) -> None:
        self._secret_for = secret_for
        self._clock = clock
        self.nonces = NonceCache()

    def verify(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        headers: Mapping[str, Sequence[str]],
        body: bytes,
    ) -> str:
        """`headers` maps lower-case names to every value received."""
        authorization = headers.get("authorization")
        if not authorization:
            raise _incomplete("the Authorization header is missing")
        if len(authorization) != 1:
            raise _incomplete("more than one Authorization header")
        match = _AUTHORIZATION.fullmatch(authorization[0].strip())
        if match is None:
            algorithm = authorization[0].split(" ", 1)[0]
            if algorithm != ALGORITHM:
                raise _incomplete(f"unsupported signature algorithm (only {ALGORITHM})")
            raise _incomplete(
                "Authorization must be 'ACS3-HMAC-SHA256 Credential=...,"
                "SignedHeaders=...,Signature=<64 hex digits>'"
            )
        signed = match["headers"].split(";")
        if signed != sorted(set(signed)):
            raise _incomplete("SignedHeaders must be sorted, lower-case and without repeats")
        must_sign = set(_REQUIRED_HEADERS) | {
            name for name in headers if name.startswith("x-acs-") or name == "content-type"
        }
        for name in sorted(must_sign):
            if name not in headers:
                raise _incomplete(f"the {name} header is missing")
            if name not in signed:
                raise _incomplete(f"the {name} header is not signed")
        for name in signed:
            if name not in headers:
                raise _incomplete(f"signed header {name} is not in the request")
        for name in ("x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256"):
            if len(headers[name]) != 1 or not headers[name][0].strip():
                raise _incomplete(f"the {name} header must have exactly one value")

        now = self._clock()
        date = parse_date(headers["x-acs-date"][0].strip())
        if abs(now - date) > CLOCK_SKEW_SECONDS:
            raise EcsError(
                "InvalidTimeStamp.Expired",
                "Specified time stamp or date value is expired "
                "(x-acs-date must be within 15 minutes of the server's clock).",
            )

        access_key_id = match["ak"]
        secret = self._secret_for(access_key_id)
        if secret is None:
            raise EcsError("InvalidAccessKeyId.NotFound", "Specified access key is not found.")

        payload_hash = hashlib.sha256(body).hexdigest()
        declared = headers["x-acs-content-sha256"][0].strip()
        expected = sign(secret, string_to_sign(method, path, query, headers, signed, payload_hash))
        # Both comparisons run whatever the first says: no timing hint either way.
        signature_ok = hmac.compare_digest(expected, match["signature"])
        payload_ok = hmac.compare_digest(declared, payload_hash)
        if not (signature_ok and payload_ok):
            raise EcsError(
                "SignatureDoesNotMatch", "Specified signature is not matched with our calculation."
            )
        self.nonces.check_and_remember(
            access_key_id,
            headers["x-acs-signature-nonce"][0].strip(),
            until=date + CLOCK_SKEW_SECONDS,
            now=now,
        )
        return access_key_id
