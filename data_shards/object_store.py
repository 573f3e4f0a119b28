"""Splits in S3-compatible object storage: `s3://bucket/prefix/<split>/manifest.json` and its shards, read and
written through boto3 (the AWS SDK) with this module's retry rule.

Credentials and endpoint come from the standard AWS places only, as boto3 reads them: `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), `AWS_PROFILE` with `~/.aws/credentials` and `~/.aws/config`,
instance roles; `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`, or `endpoint_url` in the profile) for a store
that is not AWS (MinIO, Ceph, a local moto server); `AWS_DEFAULT_REGION`. Nothing here prints or stores them.

Reading an object (`S3Reader`, a seekable raw stream): one GET streamed from the current position; a transient
failure (connection refused or reset, a read timeout, HTTP 500/502/503/504, `SlowDown` and the other throttling
codes) is retried from the byte where it stopped (a ranged GET pinned to the object's ETag, so an object replaced
meanwhile is caught, never mixed), after a bounded exponential backoff (RETRY_BASE_S doubling, at most
RETRY_MAX_S each, ATTEMPTS tries in all); every retry is logged with the running count of this process
(`retries()`). When the tries run out, `StoreUnavailable` (exit 1: the data is fine, the store is not). A
permanent failure raises at once, one line naming the object and the fix: a missing object or bucket
(`MissingData`), credentials the store refuses (`StoreAccessDenied`), an object replaced during a read
(`DamagedShard`): all DataErrors (exit 2). Socket timeouts (CONNECT_TIMEOUT_S, READ_TIMEOUT_S) bound every call,
so a store that stops answering is a failure, never a hang.

Tunables (environment): `AWS_MAX_ATTEMPTS` (the SDK's own name; default ATTEMPTS), `DATA_SHARDS_S3_TIMEOUT_S`
(the read timeout, default READ_TIMEOUT_S).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable

from .errors import DamagedShard, DataError, MissingData, StoreUnavailable

log = logging.getLogger("data_shards")

SCHEME = "s3://"
ATTEMPTS = 10  # tries per request in all (AWS_MAX_ATTEMPTS overrides)
RETRY_BASE_S = 0.2  # first backoff; doubled per retry ...
RETRY_MAX_S = 5.0  # ... up to this: 10 tries wait at most ~26 s in all
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # DATA_SHARDS_S3_TIMEOUT_S overrides
SKIP_BY_READING = 1 << 20  # a forward seek shorter than this reads through; longer ones start a ranged GET
THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
             "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500"}
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
          "AllAccessDisabled", "AccountProblem", "403"}
CREDENTIALS_FIX = ("set the store's credentials the standard AWS way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                   "or AWS_PROFILE with ~/.aws/credentials) and AWS_ENDPOINT_URL for a store that is not AWS")


class StoreAccessDenied(DataError):
    """The store refused this process's credentials (or it has none) for an object or bucket."""


class MissingBucket(MissingData):
    """The bucket of an s3:// location does not exist."""


def is_s3(location) -> bool:
    return str(location).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`. Raises DataError on a URL without a bucket."""
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket:
        raise DataError(f"{url}: an S3 location is s3://BUCKET/PREFIX")
    return bucket, key


def attempts() -> int:
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", ATTEMPTS)))
    except ValueError:
        return ATTEMPTS


def read_timeout() -> float:
    try:
        return float(os.environ.get("DATA_SHARDS_S3_TIMEOUT_S", READ_TIMEOUT_S))
    except ValueError:
        return READ_TIMEOUT_S


CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_clients: dict[tuple, object] = {}  # by process and the environment it was made from
_retries = 0
_lock = threading.Lock()


def client():
    """This process's S3 client (one per process: loader workers are forked; boto3 clients are thread-safe). The
    SDK's own retries are off: every try is made, counted and logged here."""
    key = (os.getpid(), read_timeout(), *(os.environ.get(k) for k in CLIENT_ENV))
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": 1}, connect_timeout=CONNECT_TIMEOUT_S,
                            read_timeout=read_timeout(), max_pool_connections=16)
            _clients[key] = boto3.session.Session().client("s3", config=config)
        return _clients[key]


def retries() -> int:
    """Transient failures retried by this process so far."""
    return _retries


def _code(exn) -> tuple[str, int]:
    response = getattr(exn, "response", None) or {}
    return (str(response.get("Error", {}).get("Code", "")),
            int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def is_transient(exn: BaseException) -> bool:
    """A failure worth another try: the network, a timeout, a throttled or failing server."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exn, ClientError):
        code, status = _code(exn)
        return code in THROTTLED or status in (500, 502, 503, 504)
    return isinstance(exn, (ConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError, Urllib3Error,
                            ConnectionResetError, TimeoutError, IncompleteRead))


class IncompleteRead(OSError):
    """A response body that ended before its Content-Length."""


def permanent_error(exn: BaseException, url: str, what: str = "object") -> Exception | None:
    """The one-line DataError for a failure that another try will not mend, or None."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    bucket = split_url(url)[0]
    if isinstance(exn, (NoCredentialsError, PartialCredentialsError)):
        return StoreAccessDenied(f"no credentials for {url}: {CREDENTIALS_FIX}")
    if not isinstance(exn, ClientError):
        return None
    code, status = _code(exn)
    if code == "NoSuchBucket":
        return MissingBucket(f"bucket {bucket} of {url} does not exist at {endpoint()}; check the location "
                           "(data.root, --out) and AWS_ENDPOINT_URL, or create the bucket")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return MissingData(f"{what} {url} does not exist (deleted or never uploaded); write the split again "
                           "(python -m data_shards write ... --out s3://...) or copy it "
                           "(python -m data_shards upload LOCAL_SPLIT_ROOT s3://...)")
    if code in DENIED or status in (401, 403):
        return StoreAccessDenied(f"the store at {endpoint()} refused access to {url} ({code or status}): "
                                 f"{CREDENTIALS_FIX}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return DamagedShard(f"{url} was replaced while it was read (its ETag changed); do not rewrite a split in "
                            "place while it is read, or restart the run")
    return None


def endpoint() -> str:
    return str(getattr(client().meta, "endpoint_url", "") or "AWS")


def call(fn: Callable, url: str, what: str = "object", on_retry: Callable[[], None] | None = None):
    """fn() with this module's retry rule (see the module docstring). Raises the permanent error's DataError,
    StoreUnavailable once ATTEMPTS tries failed; anything else unchanged (a bug)."""
    global _retries
    n = attempts()
    for attempt in range(1, n + 1):
        try:
            return fn()
        except Exception as exn:
            permanent = permanent_error(exn, url, what)
            if permanent is not None:
                raise permanent from None
            if not is_transient(exn):
                raise
            if attempt == n:
                raise StoreUnavailable(f"{url}: the store at {endpoint()} failed {n} tries in a row (last: "
                                       f"{describe(exn)}); check that it is up and reachable, then run again "
                                       "(a checkpointed run resumes where it stopped)") from None
            wait = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1))
            with _lock:
                _retries += 1
                total = _retries
            log.warning("data_shards: S3 %s, retry %d/%d in %.1f s (%d retries so far in process %d)",
                        f"{url}: {describe(exn)}", attempt, n - 1, wait, total, os.getpid())
            time.sleep(wait)
            if on_retry is not None:
                on_retry()
    raise AssertionError("unreachable")


def describe(exn: BaseException) -> str:
    code, status = _code(exn)
    if code or status:
        return f"{code or 'HTTP'} {status}".strip()
    return f"{type(exn).__name__}: {str(exn)[:160]}"


class S3Reader(io.RawIOBase):
    """A read-only, seekable raw stream over one object (wrap it in io.BufferedReader). The body is streamed from
    one GET; a transient failure mid-body resumes at the byte it stopped (a ranged GET with If-Match on the first
    response's ETag); a forward seek reads through (short) or starts a ranged GET (long). `size` and `etag`
    come from the first response. Errors: see `call`."""

    def __init__(self, url: str, what: str = "object"):
        super().__init__()
        self.url, self.what = url, what
        self.bucket, self.key = split_url(url)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body = None
        self._open(0)

    def _open(self, pos: int) -> None:
        self._drop()

        def get():
            kw = {"Bucket": self.bucket, "Key": self.key}
            if pos:
                kw["Range"] = f"bytes={pos}-"
            if self.etag:
                kw["IfMatch"] = self.etag
            return client().get_object(**kw)

        response = call(get, self.url, self.what)
        if self.etag is None:
            self.etag, self.size = response.get("ETag"), int(response["ContentLength"])
        self._body, self.pos = response["Body"], pos

    def _drop(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        want = len(buffer)
        if want == 0 or (self.size is not None and self.pos >= self.size):
            return 0

        def read():
            if self._body is None:
                self._open(self.pos)
            data = self._body.read(want)
            if not data and self.pos < self.size:
                raise IncompleteRead(f"the body ended at byte {self.pos} of {self.size}")
            return data

        def reopen():
            self._drop()

        data = call(read, self.url, self.what, on_retry=reopen)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: (self.size or 0) + offset}[whence]
        target = max(0, target)
        if target == self.pos:
            return self.pos
        if self.pos < target <= self.pos + SKIP_BY_READING and self._body is not None:
            left = target - self.pos
            while left:
                n = self.readinto(memoryview(bytearray(min(left, 1 << 16))))
                if n == 0:
                    break
                left -= n
            return self.pos
        self._drop()
        self.pos = target  # the next read starts a ranged GET here
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_object(url: str, what: str = "object", buffer_size: int = 1 << 20) -> io.BufferedReader:
    """A buffered, seekable read stream of the object at `url` (see S3Reader)."""
    return io.BufferedReader(S3Reader(url, what), buffer_size=buffer_size)


def read_object(url: str, what: str = "object") -> bytes:
    with open_object(url, what) as f:
        return f.read()


def head(url: str, what: str = "object") -> dict:
    """The object's metadata: {size, etag, metadata}. Raises as `call`."""
    bucket, key = split_url(url)
    r = call(lambda: client().head_object(Bucket=bucket, Key=key), url, what)
    return {"size": int(r["ContentLength"]), "etag": r.get("ETag"), "metadata": r.get("Metadata", {})}


def exists(url: str) -> bool:
    """Whether the object is there. Raises MissingBucket, and as `call`."""
    try:
        head(url)
    except MissingBucket:
        raise
    except MissingData:
        return False
    return True


def upload_file(path: str, url: str, metadata: dict | None = None) -> None:
    """Upload a local file to `url` in one PUT (S3 takes up to 5 GB so; shards are far smaller), with user
    metadata (e.g. its sha256). Retried as `call`."""
    bucket, key = split_url(url)

    def put():
        with open(path, "rb") as f:
            return client().put_object(Bucket=bucket, Key=key, Body=f, Metadata=metadata or {})

    call(put, url, "upload of")


def delete(url: str) -> None:
    bucket, key = split_url(url)
    call(lambda: client().delete_object(Bucket=bucket, Key=key), url)


def list_keys(url_prefix: str) -> list[str]:
    """The s3:// URLs of every object under a prefix."""
    bucket, prefix = split_url(url_prefix)
    out = []

    def page(token):
        kw = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        return client().list_objects_v2(**kw)

    token = None
    while True:
        r = call(lambda t=token: page(t), url_prefix, "prefix")
        out += [f"{SCHEME}{bucket}/{o['Key']}" for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return out
        token = r.get("NextContinuationToken")


__all__ = ["MissingBucket", "S3Reader", "StoreAccessDenied", "StoreUnavailable", "call", "client", "head", "is_s3",
           "list_keys", "open_object", "read_object", "retries", "split_url", "upload_file"]
