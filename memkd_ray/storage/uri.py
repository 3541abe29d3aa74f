"""Storage URIs (`file://`, plain paths, `s3://bucket/prefix`) as pyarrow filesystems.

S3 endpoint, region and credentials come from the standard AWS environment variables and
profiles (`AWS_ENDPOINT_URL` for MinIO, Ceph, moto...), resolved once by boto3's session and
handed to pyarrow explicitly, so that the filesystem object Ray ships to remote workers carries
them (in memory, never in logs or results).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from memkd_ray.errors import UserInputError

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3


class StorageError(UserInputError):
    """Storage that cannot be reached or used (wrong endpoint, bucket, credentials)."""


@dataclass(frozen=True)
class Storage:
    uri: str
    """Canonical root URI: `s3://bucket/prefix` or `file:///absolute/path`."""
    filesystem: pafs.FileSystem
    root: str
    """The root as a path of `filesystem`: `bucket/prefix` or `/absolute/path`."""

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_for(self, path: str) -> str:
        """URI of a filesystem path under this storage."""
        return f"s3://{path}" if self.scheme == "s3" else Path(path).as_uri()

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the complete new one, never a part.

        An S3 PUT (or multipart upload) becomes visible only when complete; on a local disk we
        write a sibling temporary file and rename it.
        """
        parent = path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        if self.scheme == "s3":
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
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
    return Storage(root.as_uri(), pafs.LocalFileSystem(), str(root))


def _open_s3(uri: str) -> Storage:
    import boto3

    root = uri.removeprefix("s3://").strip("/")
    bucket = root.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"--storage {uri}: no bucket name")
    session = boto3.Session()
    credentials = session.get_credentials()
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    filesystem = pafs.S3FileSystem(
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
        region=session.region_name or "us-east-1",
        endpoint_override=os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:300]
        raise StorageError(f"--storage {uri}: cannot reach the bucket ({reason})") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"--storage {uri}: bucket {bucket} not found")
    return Storage(f"s3://{root}", filesystem, root)
