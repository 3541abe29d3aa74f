"""Local-file helpers any layer may use: content digests and output directories checked
before any work."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from memkd_ray.errors import UserInputError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def writable_dir(flag: str, path: Path) -> Path:
    """`path` if it is, or can be made, a directory we can write: checked before any work, and
    without creating it, so a refused command leaves nothing behind."""
    try:
        if path.exists() and not path.is_dir():
            raise UserInputError(f"{flag} {path}: exists and is not a directory")
        existing = path.absolute()
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:  # a name too long, a symlink loop
        raise UserInputError(f"{flag} {path}: {exc.strerror or type(exc).__name__}") from None
    if not existing.is_dir():
        raise UserInputError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path}: {existing} is not writable")
    return path
