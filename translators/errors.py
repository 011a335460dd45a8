"""The one error type of the pure core: an ECS error code, a message and a field path.

ECS error codes are data: the core raises `EcsError`; the edges (command line,
HTTP API) render it. Nothing partial is ever returned alongside one.
"""

from __future__ import annotations


class EcsError(Exception):
    """A rejected model or request, as ECS would reject it.

    `code` is the ECS error code (e.g. ``InvalidParam.SourceIp``), `path` the
    dotted path of the offending field in the topology file or request
    (e.g. ``security_groups[0].permissions[2].port_range``).
    """

    def __init__(self, code: str, message: str, path: str = "") -> None:
        super().__init__(f"{code}: {message}" + (f" (at {path})" if path else ""))
        self.code = code
        self.message = message
        self.path = path

    def to_dict(self) -> dict[str, str]:
        return {"Code": self.code, "Message": self.message, "Path": self.path}
