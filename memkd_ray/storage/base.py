"""What every storage backend offers: paths under one root, whole-object reads and atomic
writes, listings. One subclass per URI scheme (local.py, s3.py), chosen in `__init__.py`."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow.fs as pafs

from memkd_ray.errors import UserInputError


class StorageError(UserInputError):
    """Storage that cannot be reached or used (wrong endpoint, bucket, credentials)."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What a run id, benchmark or category may be: one portable path component that cannot step
out of its parent ("..") or hide (".x"), the same on S3, Linux, macOS and Windows."""


def plain_name(kind: str, value: str) -> str:
    """`value` if it can be one component of a storage path, else a UserInputError."""
    if not NAME.fullmatch(value):
        raise UserInputError(f"{kind} {value!r}: must be a plain name (letters, digits, '.', "
                             "'_', '-'; starting with a letter or digit)")
    return value


@dataclass(frozen=True)
class Storage(ABC):
    """A storage root. Paths are those of `filesystem` (a pyarrow filesystem, which Ray Train
    and Tune write through); URIs are what users and stored records see."""

    uri: str
    """Canonical root URI, e.g. `s3://bucket/prefix` or `file:///absolute/path`."""
    filesystem: pafs.FileSystem
    root: str
    """The root as a path of `filesystem`: `bucket/prefix` or `/absolute/path`."""

    scheme: ClassVar[str]
    node_local: ClassVar[bool] = False
    """Whether another machine may see other contents under the same root (a local disk): on a
    cluster such storage must be checked to be shared before workers write to it."""

    @classmethod
    @abstractmethod
    def open(cls, uri: str, flag: str = "--storage") -> Storage:
        """The storage rooted at `uri`, checked to be usable; StorageError says why not,
        naming the command-line `flag` that gave the URI."""

    @classmethod
    @abstractmethod
    def container_of(cls, uri: str) -> str:
        """The root URI to open for reaching the object at `uri` (a bucket, a directory)."""

    @abstractmethod
    def uri_for(self, path: str) -> str:
        """URI of a filesystem path under this storage."""

    @abstractmethod
    def path_of(self, uri: str) -> str:
        """The filesystem path of a URI under this storage (inverse of `uri_for`)."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the complete new one, never a part."""

    @abstractmethod
    def _chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, read in one request where the backend can tear a read."""

    def check_writable(self) -> None:  # noqa: B027 (most backends learn it on first write)
        """For commands that write (train, tune): fail before any work where the backend can
        tell that writes will fail."""

    def local_path(self, path: str) -> Path | None:
        """`path` as a local file path, where this backend is a local filesystem."""
        return None

    def reference(self, uri: str) -> str:
        """`uri` relative to the root: what records kept in the store hold, so that a copied
        or moved store still points into itself."""
        path, root = self.path_of(uri).rstrip("/"), self.root.rstrip("/") + "/"
        if not path.startswith(root):
            raise StorageError(f"{uri}: not under storage {self.uri}")
        return path.removeprefix(root)

    def resolve(self, reference: str, where: str) -> str:
        """The URI a record's `reference` names: relative to the root, checked to stay under
        it, or (records written before references were relative) an absolute URI under the
        root. Anything else is refused: a stored pointer is never trusted to leave the store."""
        if not reference:
            return ""
        if "://" in reference or reference.startswith("/"):
            try:
                self.reference(reference)
            except StorageError:
                raise StorageError(f"{where}: {reference} points outside the store "
                                   f"{self.uri}") from None
            return reference
        if any(part in ("", ".", "..") for part in reference.split("/")):
            raise StorageError(f"{where}: {reference} points outside the store {self.uri}")
        return self.uri_for(f"{self.root.rstrip('/')}/{reference}")

    def path(self, *parts: str) -> str:
        """The path of `root/part/...`; every part a plain name, so none leads outside."""
        return "/".join([self.root.rstrip("/"), *(plain_name("name", p) for p in parts)])

    def list_files(self, path: str) -> list[str]:
        """Paths of all files below `path` (none if it does not exist), sorted."""
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def children(self, path: str) -> list[str]:
        """Names of the entries directly below `path` (none if it does not exist), sorted."""
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in self.filesystem.get_file_info(selector))

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def sha256(self, path: str) -> tuple[str, int]:
        """(hex digest, size in bytes) of a stored file, streamed."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self._chunks(path):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size

    def read_bytes(self, path: str) -> bytes:
        return b"".join(self._chunks(path))
