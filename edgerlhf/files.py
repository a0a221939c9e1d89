"""Small file helpers: atomic writes that never leave a half-written file, and hashes."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``path`` through a temp file and a rename.

    A crash leaves either the old file or the new one, never a partial file. With
    ``overwrite=False`` the final step is a hard link, which fails if ``path`` exists.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, raises FileExistsError when path exists
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def swap_in_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Replace folder ``target`` with the complete folder ``staging`` (two renames).

    The old ``target`` is moved aside first and deleted only after the new one is in place,
    so an interruption leaves either the old or the new folder (plus, at worst, a
    ``.old-<name>`` folder to delete by hand), never a half-written one.
    """
    staging, target = Path(staging), Path(target)
    old = target.with_name(f".old-{target.name}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target
