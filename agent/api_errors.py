"""ECS error codes -> HTTP statuses, in one place, as ECS returns them.

ECS's API reference lists a status with each error code; the pattern is
regular enough to write down as rules (checked by tests/test_api_errors.py):

- 404 for every `*.NotFound` (`InvalidSecurityGroupId.NotFound`,
  `InvalidAccessKeyId.NotFound`, `InvalidAction.NotFound` for an unknown
  action).
- 403 for refusals of a well-formed request: `Forbidden*`, `OperationDenied*`,
  `*.OperationDenied`, `DependencyViolation*`, `InvalidOperation.*`,
  `Incorrect*Status`, and the quota codes (`*LimitExceed*`, `QuotaExceed*`).
- 400 for everything about the request itself: `MissingParameter*`,
  `InvalidParameter*` / `InvalidParam*` / `Invalid*.Malformed`, and the
  signature codes (`IncompleteSignature`, `SignatureDoesNotMatch`,
  `SignatureNonceUsed`, `InvalidTimeStamp.Expired`, `InvalidTimeStamp.Format`),
  which ECS's common error table gives as 400.
- 500 `InternalError`, 503 `ServiceUnavailable`.
"""

from __future__ import annotations

# Exact codes first; they win over the rules below.
STATUS_BY_CODE: dict[str, int] = {
    "IncompleteSignature": 400,
    "SignatureDoesNotMatch": 400,
    "SignatureNonceUsed": 400,
    "InvalidTimeStamp.Expired": 400,
    "InvalidTimeStamp.Format": 400,
    "InvalidVersion": 400,
    "MissingParameter": 400,
    "InvalidParameter": 400,
    "UnsupportedHTTPMethod": 400,
    "Throttling": 400,
    "IdempotentParameterMismatch": 400,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidAction.NotFound": 404,
    "Forbidden": 403,
    "OperationDenied": 403,
    "DependencyViolation": 403,
    "InternalError": 500,
    "ServiceUnavailable": 503,
}

_FORBIDDEN_PREFIXES = ("Forbidden", "OperationDenied", "DependencyViolation", "InvalidOperation.")
_FORBIDDEN_PARTS = ("LimitExceed", "QuotaExceed")


def http_status(code: str) -> int:
    """The HTTP status ECS answers with for error `code`."""
    if code in STATUS_BY_CODE:
        return STATUS_BY_CODE[code]
    if code.endswith(".NotFound"):
        return 404
    if (
        code.startswith(_FORBIDDEN_PREFIXES)
        or code.endswith(".OperationDenied")
        or any(part in code for part in _FORBIDDEN_PARTS)
        or (code.startswith("Incorrect") and code.endswith("Status"))
    ):
        return 403
    return 400
