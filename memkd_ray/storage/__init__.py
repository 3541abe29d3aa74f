"""Where runs, checkpoints and the model registry live: one backend per URI scheme.

`BACKENDS` is the one place a scheme is looked up; everything else asks the backend
(`Storage` in base.py). A new scheme is a subclass of `Storage` and a row here.
"""

from __future__ import annotations

from memkd_ray.storage.base import NAME, Storage, StorageError, plain_name
from memkd_ray.storage.local import LocalStorage
from memkd_ray.storage.s3 import S3Storage

BACKENDS: dict[str, type[Storage]] = {backend.scheme: backend
                                      for backend in (LocalStorage, S3Storage)}

__all__ = ["BACKENDS", "NAME", "Storage", "StorageError", "open_object", "open_storage",
           "plain_name"]


def _backend(uri: str, flag: str) -> type[Storage]:
    """The backend of a URI; a plain path is a local directory."""
    if "://" not in uri:
        return LocalStorage
    scheme = uri.split("://", 1)[0]
    if scheme not in BACKENDS:
        raise StorageError(f"{flag} {uri}: unsupported scheme {scheme}:// "
                           f"({' or '.join(f'{s}://' for s in BACKENDS)})")
    return BACKENDS[scheme]


def open_storage(uri: str, flag: str = "--storage") -> Storage:
    """The storage rooted at `uri`, checked to be reachable; StorageError says why not."""
    return _backend(uri, flag).open(uri, flag)


def open_object(uri: str, flag: str = "--checkpoint") -> tuple[Storage, str]:
    """The storage holding the object at `uri` (a URI or a local path) and the object's path."""
    backend = _backend(uri, flag)
    storage = backend.open(backend.container_of(uri), flag)
    return storage, storage.path_of(uri)
