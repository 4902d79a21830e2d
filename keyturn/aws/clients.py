"""boto3 clients for keyturn's AWS backends, and how their failures are read.

Every client keyturn builds uses botocore's ``standard`` retry mode: capped
exponential backoff with full jitter (base 1 s for throttling, 50 ms
otherwise, capped at 20 s) on throttling errors, 5xx responses and
connection errors, up to `max_attempts` attempts in all (the first one
included; botocore's ``total_max_attempts``). Timeouts are
explicit, so an unreachable endpoint fails in bounded time.

`endpoint_url=None` leaves the endpoint to botocore, which honours the
standard ``AWS_ENDPOINT_URL_<SERVICE>`` and ``AWS_ENDPOINT_URL``
environment variables (useful for a local stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

__all__ = ["ClientSettings", "ClientOwner", "make_client", "error_code", "http_status", "request_id"]


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to reach one AWS service: region, endpoint, retries and timeouts (no credentials)."""

    region: str | None = None
    endpoint_url: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.region is not None and (not isinstance(self.region, str) or not self.region):
            raise ValueError("region must be a non-empty str or None")
        if self.endpoint_url is not None:
            if not isinstance(self.endpoint_url, str) or not self.endpoint_url.startswith(("http://", "https://")):
                raise ValueError("endpoint_url must be an http:// or https:// URL or None")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or not 1 <= self.max_attempts <= 20:
            raise ValueError("max_attempts must be an int in 1..20 (1 means no retries)")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 600:
                raise ValueError(f"{name} must be a number of seconds in (0, 600]")

    def config(self) -> Config:
        """The botocore `Config`: standard retry mode, `max_attempts` attempts in all, timeouts."""
        return Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )


def make_client(service: str, settings: ClientSettings) -> Any:
    """A new boto3 client for `service` (a fresh session, so it is safe to build per thread or worker)."""
    session = boto3.session.Session()
    return session.client(
        service,
        region_name=settings.region,
        endpoint_url=settings.endpoint_url,
        config=settings.config(),
    )


class ClientOwner:
    """``with`` support for an object holding a boto3 client in `_client`, built by it if `_owns_client`.

    The subclass defines `close()` and calls `_close_client()` from it.
    """

    _client: Any
    _owns_client: bool

    def close(self) -> None:
        raise NotImplementedError

    def _close_client(self) -> None:
        """Close the client if this object built it; an injected client stays open (it is the caller's)."""
        if self._owns_client:
            close = getattr(self._client, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_code(exc: ClientError) -> str:
    """The AWS error code of a `ClientError` ('' if absent)."""
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def http_status(exc: ClientError) -> int:
    """The HTTP status of a `ClientError` (0 if absent)."""
    try:
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    except (TypeError, ValueError):
        return 0


def request_id(response: dict[str, Any], fallback: str) -> str:
    """The AWS request id of a response, or `fallback` when the service sent none."""
    rid = response.get("ResponseMetadata", {}).get("RequestId")
    return rid if isinstance(rid, str) and rid else fallback
