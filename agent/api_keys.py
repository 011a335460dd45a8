"""AccessKey pairs for the HTTP API (`nftsg api-key create|list|delete`).

One JSON file in the state directory, mode 0600, owned by the agent's user.
Secrets are stored as they are (HMAC verification needs the secret itself);
the file's mode is what protects them. Writes are atomic (a 0600 temporary
file renamed over the old one) and serialised by an advisory lock, so a
concurrent `create` and `delete` never lose each other's change. The server
re-reads the file when it changes, so new keys work and deleted keys stop
working without restarting the agent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nftsg.translators.errors import EcsError

_ALPHABET = string.ascii_letters + string.digits
KEYS_FILE_NAME = "api-keys.json"


@dataclass(frozen=True, slots=True)
class AccessKey:
    access_key_id: str
    access_key_secret: str
    create_time: str


def new_access_key() -> AccessKey:
    """Shaped like Alibaba's (LTAI + 20 characters, 30-character secret, ~178 bits)."""
    key_id = "LTAI" + "".join(secrets.choice(_ALPHABET) for _ in range(20))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(30))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return AccessKey(key_id, secret, created)


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache_stamp: tuple[int, int, int] | None = None
        self._cache: dict[str, AccessKey] = {}

    # -- reading ------------------------------------------------------------

    def _read(self) -> dict[str, AccessKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        data: Any = json.loads(text)
        return {
            item["AccessKeyId"]: AccessKey(
                item["AccessKeyId"], item["AccessKeySecret"], item.get("CreateTime", "")
            )
            for item in data.get("AccessKeys", [])
        }

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of `access_key_id`, re-reading the file only when it changed."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._cache_stamp or stamp is None:
            self._cache = self._read()
            self._cache_stamp = stamp
        key = self._cache.get(access_key_id)
        return key.access_key_secret if key else None

    def list(self) -> list[AccessKey]:
        return sorted(self._read().values(), key=lambda k: (k.create_time, k.access_key_id))

    # -- writing ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, keys: dict[str, AccessKey]) -> None:
        payload = {
            "AccessKeys": [
                {
                    "AccessKeyId": k.access_key_id,
                    "AccessKeySecret": k.access_key_secret,
                    "CreateTime": k.create_time,
                }
                for k in keys.values()
            ]
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, json.dumps(payload, indent=2).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def create(self) -> AccessKey:
        with self._locked():
            keys = self._read()
            key = new_access_key()
            keys[key.access_key_id] = key
            self._write(keys)
        return key

    def delete(self, access_key_id: str) -> None:
        with self._locked():
            keys = self._read()
            if access_key_id not in keys:
                raise EcsError(
                    "InvalidAccessKeyId.NotFound",
                    f"Specified access key is not found: {access_key_id}",
                )
            del keys[access_key_id]
            self._write(keys)
