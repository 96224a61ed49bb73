"""Files written whole or not at all: a crash or a full disk never leaves half a file where one was asked for."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path`, flush it to disk, then rename it over `path`.

    On any failure (a full disk, a Ctrl-C) the temporary file is removed and `path` is as it was
    (absent, or its old content), so a reader finds either the old file or the new one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
