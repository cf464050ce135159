"""How an s3:// URI and a storage endpoint are read: the same for the trainer's downloads and the
operator's anonymous read of a backbone's config.json."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from kubetune_contract.config import StorageSpec


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_endpoint(storage: StorageSpec) -> tuple[str, bool]:
    """``(host:port, https?)`` from storage.endpoint, else ``S3_ENDPOINT``, else AWS S3."""
    endpoint = storage.endpoint or os.environ.get("S3_ENDPOINT") or "s3.amazonaws.com"
    secure = not storage.insecure
    if "://" in endpoint:
        parsed = urlparse(endpoint)
        secure = parsed.scheme == "https"
        endpoint = parsed.netloc
    return endpoint, secure
