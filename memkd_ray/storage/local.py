"""`file://` URIs and plain paths: a directory on this machine (or one every node mounts)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from memkd_ray.files import writable_dir
from memkd_ray.storage.base import Storage, StorageError


def _local(uri: str) -> Path:
    """A plain path as written, or a `file://` URI decoded (URIs percent-encode spaces...)."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri)


class LocalStorage(Storage):
    scheme = "file"
    node_local = True

    @classmethod
    def open(cls, uri: str, flag: str = "--storage") -> LocalStorage:
        if not uri:
            raise StorageError(f"{flag}: empty (a directory, file:// or s3:// URI)")
        try:
            root = _local(uri).expanduser().resolve()
            if root.exists() and not root.is_dir():
                raise StorageError(f"{flag} {uri}: not a directory")
        except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StorageError(f"{flag} {uri}: {reason}") from None
        return cls(root.as_uri(), pafs.LocalFileSystem(), str(root))

    @classmethod
    def container_of(cls, uri: str) -> str:
        return uri  # a checkpoint directory is its own root

    def uri_for(self, path: str) -> str:
        return Path(path).as_uri()

    def path_of(self, uri: str) -> str:
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"{uri}: not under storage {self.uri}")
        return str(_local(uri).expanduser().absolute())

    def check_writable(self) -> None:
        """A local root must be, or be creatable as, a writable directory."""
        writable_dir("--storage", Path(self.root))

    def local_path(self, path: str) -> Path:
        return Path(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """A sibling temporary file, then a rename."""
        parent = path.rsplit("/", 1)[0]
        staging = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        try:
            self.filesystem.create_dir(parent, recursive=True)
            with self.filesystem.open_output_stream(staging) as stream:
                stream.write(data)
            self.filesystem.move(staging, path)
        except OSError as exc:  # a read-only or full store
            raise StorageError(f"{self.uri_for(path)}: cannot write "
                               f"({str(exc).splitlines()[0][:200]})") from None
        finally:
            if self.exists(staging):
                self.filesystem.delete_file(staging)

    def _chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        with self.filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(size):
                yield chunk
