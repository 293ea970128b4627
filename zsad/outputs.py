"""Output paths a user names: ``~`` expanded, checked writable before any model loads, files and folders
created with the user's umask.

``zsad eval --out``, ``train --out``, ``predict --out``, ``report --out``, ``--cache``, ``$ZSAD_CACHE`` and
``$ZSAD_HOME`` all go through :func:`writable_dir` before the expensive part starts, so a typo or a read-only
folder costs a second, not an evaluation. safetensors' ``save_file`` and ``tempfile.mkdtemp`` create private
files (0600) and folders (0700); :func:`share_like_umask` gives them the permissions any other file the user
writes gets, so a shared results folder stays readable.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def expand(path: str | os.PathLike) -> Path:
    """``~`` and ``~user`` expanded (a quoted ``"~/x"`` in a shell never reaches the shell's expansion)."""
    return Path(os.path.expanduser(os.fspath(path)))


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """The expanded folder ``path``, after checking it can be created and written; nothing is created.

    Raises ValueError naming ``what`` (e.g. ``"--out"``) and the path when ``path`` or one of its parents is
    a file, or when the nearest existing folder refuses a write (permission, read-only file system).
    """
    folder = expand(path)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"lies under the file {probe}"
        raise ValueError(f"{what} {folder} {where}, not a folder: choose another path")
    try:
        handle, name = tempfile.mkstemp(prefix=".zsad-write-test-", dir=probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"{what} {folder}: cannot write in {probe} ({reason}); choose a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(name)
    return folder


def current_umask() -> int:
    """The process umask (read by setting and restoring it; the lock keeps threads from seeing 0)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def share_like_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would have given it (0666 / 0777 less the umask)."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())
