"""Every stage and the runner: Where things live: the project root, the shared folder, and the standard sub-folders.

Every relative path in a config is resolved against ``RunConfig.root`` (by default
the current working directory, which is the repository when a notebook runs), except
the shared data and tokenizers, which live *beside* the checkout in ``../shared``
and are never copied into it.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The repository checkout that holds this package (``edgerlhf/..``).
REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """Return the shared folder: ``$EDGERLHF_SHARED`` if set, else ``<repo>/../shared``.

    The folder may not exist (e.g. on a user's machine); callers that need a file
    from it check for the file and raise with a clear message.
    """
    env = os.environ.get("EDGERLHF_SHARED")
    return Path(env).expanduser().resolve() if env else REPO_ROOT.parent / "shared"


def resolve(path: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """Resolve ``path`` against ``root`` unless it is absolute; ``~`` is expanded.

    A path that starts with ``shared:`` is resolved against :func:`shared_dir`
    instead, so configs can name shared files independently of ``root``.
    """
    text = str(path)
    if text.startswith("shared:"):
        return shared_dir() / text[len("shared:"):].lstrip("/")
    p = Path(text).expanduser()
    return p if p.is_absolute() else (Path(root).expanduser() / p).resolve()
