"""What is on disk, and writes refused: helpers shared by the tests of files (imported as ``disk``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def files_state(directory: Path) -> dict[str, object]:
    """Every entry under ``directory``: a file's bytes, a symlink's target, or "dir"; for "nothing on disk
    changed" (compare two of them)."""
    return {str(path.relative_to(directory)): (os.readlink(path) if path.is_symlink() else "dir" if path.is_dir()
                                               else path.read_bytes())
            for path in sorted(directory.rglob("*"))}


def refuse_new_files_in(folder: Path, monkeypatch) -> None:
    """Make every ``os.open`` that creates a file directly in ``folder`` fail with EACCES, as a read-only
    folder does for a user who is not root (chmod does not stop root, and CI may run as root)."""
    real_open = os.open

    def open_refusing(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.path.abspath(path)).parent == Path(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_refusing)
