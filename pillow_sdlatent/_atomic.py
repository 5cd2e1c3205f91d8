"""Replace a file in one step, so that nobody sees half of it and a failure leaves the old one."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    On any failure ``path`` is left as it was and the temporary file is removed.
    Like ``open(path, "wb")``, a symlink is written through, an existing file
    keeps its permission bits and a new one gets the umask's.
    """
    target = Path(os.path.realpath(path))
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
