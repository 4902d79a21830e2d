"""Wrappers around a KMS backend: the one rate limit and the one call counter.

- `TokenBucket`: the client-side rate limit in requests per second (the
  only token bucket in keyturn).
- `process_bucket(kms_name, rate)`: the bucket this process shares for one
  KMS at one rate. Every KMS client a key source opens in the process
  (each CLI command, each DoFn instance on each thread) takes its tokens
  from it.
- `RateLimitedKms`: takes one token before each GenerateDataKey, Decrypt
  and ReEncrypt of a backend that does not limit itself (`LocalKms`).
  `AwsKms` takes its tokens in a botocore hook instead, one per HTTP
  attempt, so a retry also counts. Wrapping an already limited backend is
  refused (`ValueError`), so two limits can never run in series.
- `CountingKms` / `KmsCallLog`: count successful calls per operation.

``lifecycle.max_kms_requests_per_second`` is applied in exactly one place:
the key source's ``open_kms()`` (`keyturn.keysource.LocalKeySource`,
`keyturn.aws.keysource.AwsKeySource`), with `process_bucket`. Nothing else
adds a limit.

Every wrapper passes other attributes (``has_kek``, ``check_usable``,
``rate_limiter``...), ``close()`` and ``with`` on to the backend it wraps.
None of them holds key material of its own; the backend's refusal to be
pickled still applies.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations: keyturn.kms.base re-exports CountingKms and KmsCallLog from here
    from keyturn.kms.base import GeneratedDataKey, KmsBackend, RewrappedDataKey, UnwrappedDataKey

__all__ = ["TokenBucket", "process_bucket", "DEFAULT_REQUESTS_PER_SECOND", "RateLimitedKms", "CountingKms", "KmsCallLog"]

DEFAULT_REQUESTS_PER_SECOND = 50.0  # the default of lifecycle.max_kms_requests_per_second, and of the key sources


class TokenBucket:
    """Blocks callers so that at most `rate` requests per second pass (after a burst of `burst`).

    The bucket holds at most `burst` tokens and refills at `rate` tokens
    per second. Each request takes one token; when none is left the caller
    sleeps until its token is due. Tokens are reserved under a lock before
    sleeping, so concurrent callers queue in order and never busy-wait.

    Guarantee: over any interval of T seconds at most ``burst + rate * T``
    requests pass. The clock and the sleep are injectable, so tests check
    the guarantee on a fake clock without waiting. `taken` counts tokens
    taken, `waits` the takes that had to sleep.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`burst` defaults to max(1, rate): one second's worth of requests."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError("rate must be a finite number of requests per second > 0")
        if burst is None:
            burst = max(1.0, float(rate))
        if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not math.isfinite(burst) or burst < 1:
            raise ValueError("burst must be a finite number >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()
        self.taken = 0
        self.waits = 0

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; return the seconds slept (0.0 if none)."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)
            self._last = now
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate) - 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.taken += 1
            self.waits += wait > 0
        if wait > 0:
            self._sleep(wait)
        return wait

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:g}/s, burst={self.burst:g})"


_buckets: dict[tuple[str, float], TokenBucket] = {}
_buckets_lock = threading.Lock()


def process_bucket(
    kms_name: str,
    rate: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> TokenBucket:
    """The one `TokenBucket` of this process for the KMS named `kms_name` at `rate` requests per second.

    `kms_name` says which KMS (a key source's ``kms_name``: a keystore path,
    or an AWS region and endpoint); it holds no secret. The same name and
    rate give the same bucket for the life of the process, so the limit
    holds per process however many clients are opened. `clock` and `sleep`
    are used only by the call that makes the bucket (tests make it first,
    on a fake clock).
    """
    key = (kms_name, float(rate))
    with _buckets_lock:
        bucket = _buckets.get(key)
        if bucket is None:
            bucket = _buckets[key] = TokenBucket(rate, clock=clock, sleep=sleep)
        return bucket


class _Wrapper:
    """Passes everything a wrapper does not define on to `inner`."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never reached for `inner` itself once set; keeps copy/pickle probes local
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RateLimitedKms(_Wrapper):
    """A backend whose every generate/decrypt/rewrap first takes a token from `bucket`.

    `ValueError` if `inner` is already rate-limited (it has a
    ``rate_limiter``): one limit per KMS call, never two in series.
    """

    def __init__(self, inner: KmsBackend, bucket: TokenBucket) -> None:
        if getattr(inner, "rate_limiter", None) is not None:
            raise ValueError(f"{inner!r} is already rate-limited; a second limit in series would apply the rate twice")
        self.inner = inner
        self.rate_limiter = bucket

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        self.rate_limiter.acquire()
        return self.inner.generate_data_key(kek_id, context)

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        self.rate_limiter.acquire()
        return self.inner.decrypt(kek_id, wrapped, context)

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> RewrappedDataKey:
        self.rate_limiter.acquire()
        return self.inner.rewrap(wrapped, **kwargs)

    def __repr__(self) -> str:
        return f"RateLimitedKms({self.inner!r}, {self.rate_limiter!r})"


@dataclass
class KmsCallLog:
    """Counts of KMS calls by operation, and their request ids."""

    generate: int = 0
    decrypt: int = 0
    rewrap: int = 0
    request_ids: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.generate + self.decrypt + self.rewrap


class CountingKms(_Wrapper):
    """Wraps a backend and counts successful calls per operation (for tests, metrics, benchmarks)."""

    def __init__(self, inner: KmsBackend) -> None:
        self.inner = inner
        self.calls = KmsCallLog()

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        result = self.inner.generate_data_key(kek_id, context)
        self.calls.generate += 1
        self.calls.request_ids.append(result.request_id)
        return result

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        result = self.inner.decrypt(kek_id, wrapped, context)
        self.calls.decrypt += 1
        self.calls.request_ids.append(result.request_id)
        return result

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> RewrappedDataKey:
        result = self.inner.rewrap(wrapped, **kwargs)
        self.calls.rewrap += 1
        self.calls.request_ids.append(result.request_id)
        return result

    def __repr__(self) -> str:
        return f"CountingKms({self.inner!r}, calls={self.calls.total})"
