"""How a lake reaches S3: explicit, picklable settings (never credentials), and the URI form.

`S3Settings` names the endpoint (``endpoint_override`` host[:port] plus
``scheme``) and the region, and builds the `pyarrow.fs.S3FileSystem` and,
for the lake lock's conditional writes, a boto3 S3 client. Credentials are
never part of it: both clients take them from the usual AWS chain
(environment, instance or task role, profile) on the machine that uses
them. A `keyturn.lake.Lake` built from an ``s3://`` URI keeps its settings
and pickles them, so a Beam worker rebuilds the *same* filesystem (the
same endpoint) instead of resolving it again from its own environment.

Where the settings of ``Lake("s3://bucket/prefix")`` come from, first match wins:

1. query parameters of the URI (``?endpoint_override=host:port&scheme=http&region=R``);
2. settings passed in (``Lake(uri, s3=S3Settings(...))``; the CLI passes
   ``--s3-endpoint-url`` or the config's ``lake.s3_endpoint_url`` this way);
3. the standard AWS variables ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``
   (what botocore honours too, so KMS, DynamoDB and the lake agree), read
   once on the machine that builds the lake;
4. none: Arrow's default AWS endpoint for the region.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

__all__ = ["S3Settings", "parse_s3_uri", "settings_of_filesystem", "s3_client", "split_bucket_key"]

_QUERY_KEYS = ("endpoint_override", "scheme", "region")
_ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Endpoint and region of an S3 lake. No credentials, ever: they come from the AWS chain where used."""

    endpoint_override: str | None = None
    scheme: str = "https"
    region: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https', not {self.scheme!r}")
        if self.endpoint_override is not None:
            if not isinstance(self.endpoint_override, str) or not self.endpoint_override:
                raise ValueError("endpoint_override must be a non-empty host[:port] or None")
            if "://" in self.endpoint_override or "/" in self.endpoint_override or any(
                c.isspace() for c in self.endpoint_override
            ):
                raise ValueError("endpoint_override is host[:port] (give the scheme separately, or use from_endpoint_url)")
        if self.region is not None and (not isinstance(self.region, str) or not self.region):
            raise ValueError("region must be a non-empty str or None")

    @classmethod
    def from_endpoint_url(cls, url: str | None, *, region: str | None = None) -> S3Settings:
        """``http://host:port`` (or https) -> settings; None -> AWS's endpoint."""
        if url is None:
            return cls(region=region)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ValueError("an S3 endpoint URL looks like http://host:port or https://host, without a path")
        return cls(endpoint_override=parts.netloc, scheme=parts.scheme, region=region)

    @classmethod
    def from_environment(cls, *, region: str | None = None) -> S3Settings:
        """The endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (None if neither is set)."""
        for name in _ENV_ENDPOINTS:
            value = os.environ.get(name)
            if value:
                return cls.from_endpoint_url(value.rstrip("/"), region=region)
        return cls(region=region)

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint as a URL (what boto3 takes), or None for AWS's own."""
        return None if self.endpoint_override is None else f"{self.scheme}://{self.endpoint_override}"

    def filesystem(self) -> pafs.S3FileSystem:
        """A new `S3FileSystem` for these settings; credentials from the AWS chain."""
        kwargs: dict[str, Any] = {"scheme": self.scheme}
        if self.endpoint_override is not None:
            kwargs["endpoint_override"] = self.endpoint_override
        if self.region is not None:
            kwargs["region"] = self.region
        return pafs.S3FileSystem(**kwargs)


def parse_s3_uri(uri: str, base: S3Settings | None = None) -> tuple[S3Settings, str]:
    """``s3://bucket/prefix[?endpoint_override=..&scheme=..&region=..]`` -> (settings, ``bucket/prefix``).

    Query parameters win over `base`; with neither, the AWS endpoint
    variables are read (see the module docstring).
    """
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_QUERY_KEYS))
    if unknown:
        raise ValueError(f"unsupported query parameter(s) in S3 lake URI: {', '.join(unknown)} (allowed: {', '.join(_QUERY_KEYS)})")
    settings = base if base is not None else (S3Settings() if query.get("endpoint_override") else S3Settings.from_environment())
    if query:
        settings = replace(
            settings,
            endpoint_override=query.get("endpoint_override") or settings.endpoint_override,
            scheme=query.get("scheme") or settings.scheme,
            region=query.get("region") or settings.region,
        )
    root = (parts.netloc + "/" + parts.path.strip("/")).rstrip("/")
    return settings, root


def settings_of_filesystem(fs: pafs.FileSystem) -> tuple[S3Settings, dict[str, str]] | None:
    """The settings (and any explicit credentials, kept out of the settings) of an injected `S3FileSystem`."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    kwargs = fs.__reduce__()[1][0]
    endpoint = kwargs.get("endpoint_override") or None
    scheme = kwargs.get("scheme") or "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
        endpoint = endpoint.rstrip("/")
    settings = S3Settings(endpoint_override=endpoint, scheme=scheme, region=kwargs.get("region") or None)
    creds = {
        name: kwargs[key]
        for name, key in (
            ("aws_access_key_id", "access_key"),
            ("aws_secret_access_key", "secret_key"),
            ("aws_session_token", "session_token"),
        )
        if kwargs.get(key)
    }
    return settings, creds


def split_bucket_key(path: str) -> tuple[str, str]:
    """``bucket/a/b`` -> (``bucket``, ``a/b``)."""
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise ValueError(f"expected bucket/key, got {path!r}")
    return bucket, key


def s3_client(settings: S3Settings, credentials: dict[str, str] | None = None, *, max_attempts: int = 5) -> Any:
    """A boto3 S3 client for `settings` (standard retries, explicit timeouts); credentials from the chain.

    `credentials` is only for a lake whose injected `S3FileSystem` was given
    explicit keys; they stay in this client and are never stored elsewhere.
    """
    from keyturn.aws.clients import ClientSettings

    cfg = ClientSettings(settings.region, settings.endpoint_url, max_attempts).config()
    import boto3

    session = boto3.session.Session()
    return session.client(
        "s3", region_name=settings.region, endpoint_url=settings.endpoint_url, config=cfg, **(credentials or {})
    )
