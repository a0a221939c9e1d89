"""Every stage: Small file helpers: atomic writes that never leave a half-written file, and hashes."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it becomes ``path`` in one rename.

    A crash or an exception leaves either the old file or the new one, never a partial file, and no
    temporary file. The new file gets the usual mode (``0o666`` less the umask), not ``mkstemp``'s
    0600. With ``overwrite=False`` the final step is a hard link, which fails if ``path`` exists.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, raises FileExistsError when path exists
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``path`` atomically (:func:`atomic_path`, fsynced).

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
    """
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | os.PathLike, pattern: str = "*.safetensors") -> str:
    """Hex SHA-256 over the files of ``folder`` (recursively) whose names match ``pattern``: each file's path
    relative to ``folder`` and its :func:`sha256_file`, in sorted order. Identifies a model's weights, sharded
    or not.

    Raises:
        FileNotFoundError: no file matches (the message names the folder and the pattern).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no {pattern} file to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the C library or the file system lacks the call
    (errno ENOSYS, EINVAL, ENOTSUP); :func:`swap_in_dir` then uses two renames.

    Raises:
        OSError: any other failure of the call (missing path, permissions...).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def new_staging(target: str | os.PathLike, run_id: str) -> Path:
    """An empty staging folder ``.<name>.staging-<run_id>`` beside ``target``, private to the run ``run_id``; fill
    it, then :func:`swap_in_dir` it in as ``target``. Staging folders of ``target`` left by other runs (a killed
    run's) are removed first: call it only under the project lock (:mod:`edgerlhf.core.lock`), which makes every
    other run a dead one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        shutil.rmtree(stale)
    staging = target.parent / f".{target.name}.staging-{run_id}"
    staging.mkdir()
    return staging


def swap_in_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Replace folder ``target`` with the complete folder ``staging``; returns ``target``.

    Where the platform allows, the two folders are exchanged in one atomic step (:func:`exchange`),
    so ``target`` always exists, old or new. Elsewhere the old ``target`` is renamed aside to
    ``.old-<name>`` first; if an interruption falls between the two renames, the next call finds
    ``.old-<name>`` without ``target`` and restores it before anything else, so the last good folder
    is never lost. The old folder is deleted only once the new one is in place.
    """
    staging, target = Path(staging), Path(target)
    old = target.with_name(f".old-{target.name}")
    if old.exists() and not target.exists():  # an earlier swap stopped between its two renames
        old.rename(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists() and exchange(staging, target):
        shutil.rmtree(staging)  # now holds the old folder
        return target
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target
