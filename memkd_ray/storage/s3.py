"""`s3://bucket/prefix`: AWS S3 or any S3-compatible endpoint (MinIO, Ceph, moto...).

Endpoint and region come from the standard AWS environment variables and profiles
(`AWS_ENDPOINT_URL` for MinIO, Ceph, moto...) and travel with the filesystem object Ray ships
to remote workers. Credentials never do: boto3 and pyarrow each use the default AWS credential
chain (environment, profile, web identity, container and instance metadata) in the process that
touches the bucket, so temporary credentials refresh on every node and no key is pickled (Ray
Tune pickles the run's filesystem into `tuner.pkl` in the bucket).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from memkd_ray.storage.base import Storage, StorageError

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3
S3_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class S3Storage(Storage):
    client: Any = field(default=None, repr=False, compare=False)
    """boto3 S3 client for whole-object reads and writes. pyarrow reads an object with a HEAD
    then ranged GETs, which can tear across a concurrent replacement; one GET cannot."""

    scheme = "s3"

    @classmethod
    def open(cls, uri: str, flag: str = "--storage") -> S3Storage:
        import boto3
        import botocore.config

        root = uri.removeprefix("s3://").strip("/")
        bucket = root.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{flag} {uri}: no bucket name")
        session = boto3.Session()
        region = session.region_name or "us-east-1"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        _probe(session, region, endpoint, bucket, f"{flag} {uri}")
        client = session.client(
            "s3", region_name=region, endpoint_url=endpoint,
            config=botocore.config.Config(
                connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_REQUEST_TIMEOUT_S,
                retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
            ),
        )
        # No keys given: pyarrow's default credential provider chain, which refreshes
        # temporary credentials and leaves them out of the object's pickle.
        filesystem = pafs.S3FileSystem(
            region=region,
            endpoint_override=endpoint,
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            request_timeout=S3_REQUEST_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        )
        return cls(f"s3://{root}", filesystem, root, client)

    @classmethod
    def container_of(cls, uri: str) -> str:
        return "s3://" + uri.removeprefix("s3://").split("/", 1)[0]

    def uri_for(self, path: str) -> str:
        return f"s3://{path}"

    def path_of(self, uri: str) -> str:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri}: not under storage {self.uri}")
        return uri.removeprefix("s3://").rstrip("/")

    def write_bytes(self, path: str, data: bytes) -> None:
        """One PUT: an object becomes visible only when complete."""
        bucket, key = path.split("/", 1)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def _chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        bucket, key = path.split("/", 1)
        yield from self.client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(size)


def _probe(session: Any, region: str, endpoint: str | None, bucket: str, where: str) -> None:
    """One quick try: an endpoint that accepts connections and never answers must not cost the
    long timeouts and retries that real transfers get."""
    import botocore.config
    import botocore.exceptions

    try:
        probe = session.client(
            "s3", region_name=region, endpoint_url=endpoint,
            config=botocore.config.Config(connect_timeout=S3_CONNECT_TIMEOUT_S,
                                          read_timeout=S3_PROBE_TIMEOUT_S,
                                          retries={"total_max_attempts": 1, "mode": "standard"}),
        )
        probe.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{where}: bucket {bucket} not found") from None
        raise StorageError(f"{where}: the bucket refused access ({code})") from None
    except (botocore.exceptions.BotoCoreError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]  # botocore's reasons span lines
        raise StorageError(f"{where}: cannot reach the bucket ({reason})") from None
