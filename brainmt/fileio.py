"""Small file writes that never leave a half-written file behind (a preempted job, a full disk)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix), private to this host and process, renamed to ``path`` when the
    block ends without error and removed otherwise: ``path`` is whole or as it was, also when the tasks of a job
    array on several nodes write it at once."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{path.name}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a private temporary file beside ``path``, then rename it into place."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: object) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
