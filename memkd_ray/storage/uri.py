"""Storage URIs (`file://`, plain paths, `s3://bucket/prefix`) as pyarrow filesystems.

S3 endpoint and region come from the standard AWS environment variables and profiles
(`AWS_ENDPOINT_URL` for MinIO, Ceph, moto...) and travel with the filesystem object Ray ships to
remote workers. Credentials never do: boto3 and pyarrow each use the default AWS credential
chain (environment, profile, web identity, container and instance metadata) in the process that
touches the bucket, so temporary credentials refresh on every node and no key is pickled (Ray
Tune pickles the run's filesystem into `tuner.pkl` in the bucket).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from memkd_ray.errors import UserInputError

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3
S3_PROBE_TIMEOUT_S = 5.0


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
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path}: exists and is not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path}: {existing} is not writable")
    return path


@dataclass(frozen=True)
class Storage:
    uri: str
    """Canonical root URI: `s3://bucket/prefix` or `file:///absolute/path`."""
    filesystem: pafs.FileSystem
    root: str
    """The root as a path of `filesystem`: `bucket/prefix` or `/absolute/path`."""
    s3: Any = field(default=None, repr=False, compare=False)
    """boto3 S3 client for whole-object reads and writes. pyarrow reads an object with a HEAD
    then ranged GETs, which can tear across a concurrent replacement; one GET cannot."""

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    def path(self, *parts: str) -> str:
        """The path of `root/part/...`; every part a plain name, so none leads outside."""
        return "/".join([self.root.rstrip("/"), *(plain_name("name", p) for p in parts)])

    def check_writable(self) -> None:
        """For commands that write (train, tune): a local root must be, or be creatable as, a
        writable directory. (S3 permissions show on the first write.)"""
        if self.scheme == "file":
            writable_dir("--storage", Path(self.root))

    def uri_for(self, path: str) -> str:
        """URI of a filesystem path under this storage."""
        return f"s3://{path}" if self.scheme == "s3" else Path(path).as_uri()

    def path_of(self, uri: str) -> str:
        """The filesystem path of a URI under this storage (inverse of `uri_for`)."""
        if uri.startswith("s3://") and self.scheme == "s3":
            return uri.removeprefix("s3://")
        if uri.startswith("file://") and self.scheme == "file":
            return str(Path(uri.removeprefix("file://")))
        raise StorageError(f"{uri}: not under storage {self.uri}")

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

    def _chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        if self.s3 is not None:
            bucket, key = path.split("/", 1)
            yield from self.s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(size)
            return
        with self.filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(size):
                yield chunk

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the complete new one, never a part.

        An S3 PUT becomes visible only when complete; on a local disk we write a sibling
        temporary file and rename it.
        """
        if self.s3 is not None:
            bucket, key = path.split("/", 1)
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
            return
        parent = path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        staging = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        try:
            with self.filesystem.open_output_stream(staging) as stream:
                stream.write(data)
            self.filesystem.move(staging, path)
        finally:
            if self.exists(staging):
                self.filesystem.delete_file(staging)


def open_storage(uri: str) -> Storage:
    """Parse a storage URI and check that it can be reached; StorageError says why not."""
    if uri.startswith("s3://"):
        return _open_s3(uri)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"--storage {uri}: unsupported scheme {scheme}:// (file:// or s3://)")
    root = Path(uri.removeprefix("file://")).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise StorageError(f"--storage {uri}: not a directory")
    return Storage(root.as_uri(), pafs.LocalFileSystem(), str(root))


def _open_s3(uri: str) -> Storage:
    import boto3
    import botocore.config
    import botocore.exceptions

    root = uri.removeprefix("s3://").strip("/")
    bucket = root.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"--storage {uri}: no bucket name")
    session = boto3.Session()
    region = session.region_name or "us-east-1"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # One quick try first: an endpoint that accepts connections and never answers must not
    # cost the long timeouts and retries that real transfers get.
    probe = session.client(
        "s3", region_name=region, endpoint_url=endpoint,
        config=botocore.config.Config(connect_timeout=S3_CONNECT_TIMEOUT_S,
                                      read_timeout=S3_PROBE_TIMEOUT_S,
                                      retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    try:
        probe.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"--storage {uri}: bucket {bucket} not found") from None
        raise StorageError(f"--storage {uri}: the bucket refused access ({code})") from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        reason = str(exc).splitlines()[0][:300]
        raise StorageError(f"--storage {uri}: cannot reach the bucket ({reason})") from None
    client = session.client(
        "s3", region_name=region, endpoint_url=endpoint,
        config=botocore.config.Config(
            connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_REQUEST_TIMEOUT_S,
            retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
        ),
    )
    # No keys given: pyarrow's default credential provider chain, which refreshes temporary
    # credentials and leaves them out of the object's pickle.
    filesystem = pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )
    return Storage(f"s3://{root}", filesystem, root, client)
