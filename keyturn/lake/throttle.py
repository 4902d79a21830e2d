"""A KMS wrapper that keeps calls under a rate: ``lifecycle.max_kms_requests_per_second``.

Batch-lazy rotation bounds both concurrency and KMS calls. `RateLimitedKms`
is a token bucket shared by the threads of one worker: each call takes a
token, waiting (`sleep`) until one is free. The clock and the sleep are
injected so tests need no real time. On a distributed runner the bound is
per worker, like the thread pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedKms"]


class RateLimitedKms:
    """Wraps a KMS backend; at most `rate` calls per second on average, bursts up to `burst`."""

    def __init__(
        self,
        inner: Any,
        rate: float,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0 calls per second")
        self.inner = inner
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else max(1, rate)))
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()
        self.waited = 0.0

    def _take(self) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
            self._tokens -= 1  # may go negative: later callers wait behind this one
            self.waited += wait
        if wait > 0:
            self._sleep(wait)

    def generate_data_key(self, kek_id: str, context: Any) -> Any:
        self._take()
        return self.inner.generate_data_key(kek_id, context)

    def decrypt(self, kek_id: str, wrapped: bytes, context: Any) -> Any:
        self._take()
        return self.inner.decrypt(kek_id, wrapped, context)

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> Any:
        self._take()
        return self.inner.rewrap(wrapped, **kwargs)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"RateLimitedKms({self.inner!r}, rate={self.rate})"
