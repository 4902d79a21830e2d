"""`TokenBucket`: a client-side rate limit in requests per second.

The bucket holds at most `burst` tokens and refills at `rate` tokens per
second. Each request takes one token; when none is left the caller sleeps
until its token is due. Tokens are reserved under a lock before sleeping, so
concurrent callers queue in order and never busy-wait.

Guarantee: over any interval of T seconds at most ``burst + rate * T``
requests pass. The clock and the sleep are injectable, so tests check the
guarantee on a fake clock without waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Blocks callers so that at most `rate` requests per second pass (after a burst of `burst`)."""

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

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; return the seconds slept (0.0 if none)."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)
            self._last = now
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate) - 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:g}/s, burst={self.burst:g})"
