"""An S3-compatible bucket, reduced to the few blob operations the result store needs.

boto3 reads the endpoint, region and credentials the standard AWS way: the environment
(`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), `~/.aws/config`
and `~/.aws/credentials`, instance and container roles. None of it passes through ndif-jobs,
and none of it is ever logged: every error is turned into one line naming the bucket, the
endpoint and what to do (`StoreError`), never the credentials.

Large objects move through boto3's transfer manager (parts in parallel, each part's checksum
checked by the server); the manifest is written with `If-None-Match: *`, so that of two
writers of one key only the first commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from ..errors import BadInput, ResultMissing, StoreError

#: Parallel parts per transfer, and the part size: measured against moto and MinIO, 8 MiB parts
#: in 10 threads keep a transfer at the client's own best.
TRANSFER_THREADS = 10
PART_BYTES = 8 << 20

_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
           "InvalidClientTokenId", "UnrecognizedClientException", "403", "Forbidden"}
_HOW_TO_AUTH = "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials"


@dataclass(frozen=True)
class Downloaded:
    """What a download wrote: its sha256 (hex) and size, taken from the bytes as they passed."""

    sha256: str
    bytes: int


class _HashingWriter:
    """A file that hashes what is written to it. It says it cannot seek, so boto3's transfer
    manager writes the parts in order (holding early ones back) instead of seeking between them."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.digest, self.written = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.written += len(data)
        return self.f.write(data)

    def seekable(self) -> bool:
        return False


class CommitRaced(Exception):
    """Another writer committed the object first (`If-None-Match: *` failed)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    bytes: int
    modified: float


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise BadInput(f"store URL {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class S3Bucket:
    """One bucket and prefix; names passed in are relative to the prefix."""

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client: Any = None
        self._transfer: Any = None
        self._lock = threading.Lock()  # a boto3 session must not build clients in two threads at once

    @property
    def client(self) -> Any:
        with self._lock:
            return self._client or self._connect()

    def _connect(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from boto3.s3.transfer import TransferConfig
                from botocore.config import Config
            except ImportError:
                raise StoreError("an s3:// store needs boto3: pip install 'ndif-jobs[s3]'") from None
            attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
            config = Config(max_pool_connections=TRANSFER_THREADS * 2, connect_timeout=10, read_timeout=120,
                            retries={"mode": "standard", "max_attempts": int(attempts) if attempts.isdigit() else 4})
            with self.errors("connect to"):
                self._client = boto3.session.Session().client("s3", config=config)
            self._transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                            max_concurrency=TRANSFER_THREADS, use_threads=True)
        return self._client

    def _key(self, name: str) -> str:
        return self.prefix + name

    @contextlib.contextmanager
    def errors(self, what: str, name: str = "") -> Iterator[None]:
        """Every client error as one line: where, what failed, what to do. No credential text."""
        try:
            yield
        except (StoreError, ResultMissing, CommitRaced):
            raise
        except Exception as exc:  # botocore's exception tree is wide; name it, drop the rest
            raise StoreError(self._describe(exc, what, name)) from None

    def _describe(self, exc: Exception, what: str, name: str) -> str:
        where = f"{self.url}/{name}" if name else self.url
        kind = type(exc).__name__
        response = getattr(exc, "response", None)
        code = str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        if kind in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
            return f"result store {self.url}: no usable AWS credentials ({kind}): {_HOW_TO_AUTH}"
        if code in _DENIED:
            return f"result store {self.url} refused the credentials ({code}): {_HOW_TO_AUTH}"
        if code == "NoSuchBucket":
            return f"result store {self.url}: bucket {self.bucket} does not exist at {self._endpoint_quiet()}"
        if kind in ("EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ConnectionError", "ProxyConnectionError", "ResponseStreamingError"):
            return (f"cannot {what} {where}: the object store at {self._endpoint_quiet()} cannot be reached ({kind}); "
                    "try again when it is up")
        detail = code or kind
        return f"cannot {what} {where}: {detail}"

    def _endpoint_quiet(self) -> str:
        return str(getattr(getattr(self._client, "meta", None), "endpoint_url", "the configured endpoint"))

    # -- the blob operations ----------------------------------------------------------------

    def head(self, name: str) -> dict[str, Any] | None:
        """The object's size and metadata, or None if there is none."""
        with self.errors("read", name):
            try:
                response = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise
        return {"bytes": response["ContentLength"], "metadata": response.get("Metadata", {})}

    def get_bytes(self, name: str) -> tuple[bytes, dict[str, str]]:
        """A small object's body and metadata, read in one request (so the two belong together)."""
        with self.errors("read", name):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            except Exception as exc:
                if _is_missing(exc):
                    raise ResultMissing(f"{self.url}/{name} does not exist") from None
                raise
            return response["Body"].read(), response.get("Metadata", {})

    def iter_chunks(self, name: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        """An object's body in pieces, streamed (for hashing without keeping a copy)."""
        with self.errors("read", name):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            except Exception as exc:
                if _is_missing(exc):
                    raise ResultMissing(f"{self.url}/{name} does not exist") from None
                raise
            yield from response["Body"].iter_chunks(chunk)

    def put_bytes(self, name: str, body: bytes, metadata: dict[str, str] | None = None,
                  if_absent: bool = False) -> None:
        """Write a small object; with `if_absent`, raise `CommitRaced` if it exists already."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        with self.errors("write", name):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=body, Metadata=metadata or {},
                                       **extra)
            except Exception as exc:
                if if_absent and _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise CommitRaced(name) from None
                raise

    def upload(self, path: Path, name: str) -> None:
        self.client  # noqa: B018 - creating the client first turns bad credentials or settings into one error
        with self.errors("write", name):
            self.client.upload_file(str(path), self.bucket, self._key(name), Config=self._transfer)

    def upload_stream(self, stream: Any, name: str) -> None:
        """Upload a readable stream that cannot seek: the transfer manager reads it part by part,
        in order, and sends the parts in parallel."""
        self.client  # noqa: B018 - creating the client first turns bad credentials or settings into one error
        with self.errors("write", name):
            self.client.upload_fileobj(stream, self.bucket, self._key(name), Config=self._transfer)

    def download(self, name: str, path: Path, size: int | None = None) -> Downloaded:
        """Download an object into a file, hashing its bytes as they are written (so the caller
        checks them without reading the file again). One `size` says is smaller than a part is
        read in one request (the transfer manager would first ask for its size, then read it);
        a larger one goes through the transfer manager's parallel ranged reads, which it hands
        over in order to a writer that cannot seek."""
        self.client  # noqa: B018 - creating the client first turns bad credentials or settings into one error
        with self.errors("read", name), open(path, "wb") as f:
            writer = _HashingWriter(f)
            try:
                if size is not None and size < PART_BYTES:
                    response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
                    for chunk in response["Body"].iter_chunks(1 << 20):
                        writer.write(chunk)
                else:
                    self.client.download_fileobj(self.bucket, self._key(name), writer, Config=self._transfer)
            except Exception as exc:
                if _is_missing(exc):
                    raise ResultMissing(f"{self.url}/{name} does not exist") from None
                raise
            return Downloaded(sha256=writer.digest.hexdigest(), bytes=writer.written)

    def iter_objects(self, under: str = "") -> Iterator[ObjectInfo]:
        with self.errors("list", under):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self._key(under))
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"].timestamp())

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):
            batch = names[start : start + 1000]
            with self.errors("delete", batch[0]):
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": self._key(n)} for n in batch], "Quiet": True})


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _is_missing(exc: Exception) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")
