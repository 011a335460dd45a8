"""Reading input documents from files, within the limits of `DocumentLimits`.

Only regular files are read (a FIFO would block, /dev/zero never ends), and at
most one byte more than the size limit, so an endless or huge input is refused
after reading `max_bytes`, not after filling memory.
"""

from __future__ import annotations

import os
import stat

from nftsg.translators.errors import EcsError
from nftsg.translators.model import DEFAULT_LIMITS, DocumentLimits


def read_document_file(path: str, limits: DocumentLimits = DEFAULT_LIMITS) -> str:
    """The text of the file at `path`, or an EcsError saying why it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EcsError("InvalidParameter.File", f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EcsError("InvalidParameter.File", f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise EcsError("InvalidParameter.File", f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise EcsError(
            "InvalidParameter.TooLarge", f"{path} is larger than {limits.max_bytes} bytes"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EcsError("InvalidParameter.File", f"{path} is not UTF-8 text: {exc}") from None
