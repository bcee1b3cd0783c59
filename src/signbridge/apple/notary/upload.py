"""Uploading a submission to the notary service's object store (S3) with the temporary credentials
the Notary API returns. minio's client is small, signs with the session token, retries, and
switches to a multipart upload above ``part_size``. ``SIGNBRIDGE_NOTARY_S3_ENDPOINT`` (``host:port``,
``http://`` for plain HTTP) points it at another S3-compatible server; the code path is the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException

from .api import UploadTarget
from .errors import UploadError

DEFAULT_ENDPOINT = "https://s3.us-west-2.amazonaws.com"
DEFAULT_REGION = "us-west-2"
ENV_ENDPOINT = "SIGNBRIDGE_NOTARY_S3_ENDPOINT"
PART_SIZE = 16 * 1024 * 1024


class _Progress:
    """minio's progress protocol: ``set_meta`` then ``update`` with each part's size."""

    def __init__(self, callback: Callable[[int, int], None]) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0

    def set_meta(self, object_name: str, total_length: int) -> None:
        self.total = total_length

    def update(self, size: int) -> None:
        self.done += size
        self.callback(self.done, self.total)


def upload(
    path: Path,
    target: UploadTarget,
    *,
    endpoint: str | None = None,
    part_size: int = PART_SIZE,
    progress: Callable[[int, int], None] | None = None,
    retries: int = 5,
) -> None:
    url = endpoint or os.environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT
    parts = urlsplit(url if "://" in url else f"https://{url}")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=30, read=300),
        retries=urllib3.Retry(total=retries, backoff_factor=1.0, status_forcelist=(500, 502, 503, 504)),
    )
    client = Minio(
        parts.netloc,
        access_key=target.access_key_id,
        secret_key=target.secret_access_key,
        session_token=target.session_token,
        secure=parts.scheme == "https",
        region=DEFAULT_REGION,
        http_client=http,
    )
    try:
        client.fput_object(
            target.bucket,
            target.object,
            str(path),
            part_size=part_size,
            progress=_Progress(progress) if progress else None,
        )
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise UploadError(f"cannot upload {path.name} to the notary service: {_redacted(str(exc), target)}") from None


def _redacted(text: str, target: UploadTarget) -> str:
    for secret in (target.secret_access_key, target.session_token, target.access_key_id):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text
