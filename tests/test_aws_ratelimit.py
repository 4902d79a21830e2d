"""The client-side KMS rate limit: `TokenBucket` on a fake clock, and wired into AwsKms against moto.

No assertion reads the wall clock: time is a `FakeClock` that moves only
when the limiter sleeps, so each test checks the limit exactly.
"""

from __future__ import annotations

import threading

import pytest
from aws_support import AttemptCounter, FakeClock, FaultInjector, client, moto_url, new_kms_key, shorten_backoff  # noqa: F401

from keyturn.aws.kms import AwsKms
from keyturn.kms.decorators import TokenBucket

pytestmark = pytest.mark.aws


def max_in_window(times: list[float], window: float) -> int:
    """The most events in any half-open interval [t, t + window) starting at an event."""
    times = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window - 1e-9:
            j += 1
        best = max(best, j - i)
    return best


def test_bucket_spaces_requests_after_the_burst():
    clock = FakeClock()
    bucket = TokenBucket(5, burst=2, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(12):
        bucket.acquire()
        times.append(clock.now)
    start = times[0]
    assert times[:2] == [start, start]  # the burst passes at once
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    assert all(abs(g - 0.2) < 1e-9 for g in gaps)  # then one every 1/rate seconds
    assert max_in_window(times, 1.0) <= 2 + 5


def test_bucket_refills_while_idle_but_never_above_burst():
    clock = FakeClock()
    bucket = TokenBucket(10, burst=3, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert bucket.acquire() == 0.0
    assert bucket.acquire() == pytest.approx(0.1)
    clock.now += 60  # a long pause refills to the burst, not to 600 tokens
    waits = [bucket.acquire() for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.1) and waits[4] == pytest.approx(0.1)


@pytest.mark.parametrize("rate, burst", [(1, 1), (2.5, 1), (50, None), (0.5, 4)])
def test_bucket_bound_holds_over_every_window(rate, burst):
    clock = FakeClock()
    bucket = TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep)
    times = []
    for i in range(200):
        if i % 37 == 0:
            clock.now += 1.7  # idle gaps now and then
        bucket.acquire()
        times.append(clock.now)
    cap = bucket.burst
    for window in (0.5, 1.0, 3.0, 10.0):
        assert max_in_window(times, window) <= cap + rate * window + 1e-9


def test_bucket_threads_queue_in_order_without_exceeding_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(4, burst=1, clock=clock, sleep=lambda s: None)  # waits are recorded, not slept
    waits: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(10):
            w = bucket.acquire()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The clock never moved, so the 40 reservations were spread 0.25 s apart: waits 0, 0.25, ..., 9.75.
    assert sorted(round(w, 9) for w in waits) == [round(0.25 * i, 9) for i in range(40)]


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True, "5"])
def test_bucket_rejects_bad_rates(bad):
    with pytest.raises(ValueError):
        TokenBucket(bad)


def test_bucket_rejects_bad_burst():
    with pytest.raises(ValueError):
        TokenBucket(5, burst=0.5)


# --------------------------------------------------------------------------- wired into AwsKms


@pytest.fixture(scope="module")
def key(moto_url):
    return new_kms_key(client("kms", moto_url))


def test_aws_kms_requests_respect_the_limit(moto_url, key):
    clock = FakeClock()
    kms_client = client("kms", moto_url)
    kms = AwsKms(client=kms_client, rate_limiter=TokenBucket(5, burst=1, clock=clock, sleep=clock.sleep))
    counter = AttemptCounter(kms_client)
    counter.clock = clock
    wrapped = []
    for i in range(10):
        wrapped.append(kms.generate_data_key(key["KeyId"], {"i": str(i)}).wrapped)
    for i, w in enumerate(wrapped):
        kms.decrypt(key["KeyId"], w, {"i": str(i)})
    assert counter.total == 20
    assert max_in_window(counter.times, 1.0) <= 1 + 5
    assert clock.now - 1000.0 == pytest.approx(19 / 5)  # 20 requests at 5/s after a burst of 1
    kms.close()
    before = clock.now
    kms_client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")  # the hook is gone after close()
    assert clock.now == before


def test_retries_count_against_the_limit(moto_url, key):
    clock = FakeClock()
    kms_client = client("kms", moto_url, max_attempts=5)
    shorten_backoff(kms_client)
    kms = AwsKms(client=kms_client, rate_limiter=TokenBucket(2, burst=1, clock=clock, sleep=clock.sleep))
    injector = FaultInjector(kms_client, code="ThrottlingException", decide=lambda op, i: i % 2 == 0)
    counter = AttemptCounter(kms_client)
    counter.clock = clock
    for i in range(5):
        kms.generate_data_key(key["KeyId"], {"i": str(i)})
    assert injector.injected == 5 and counter.total == 10  # every call was throttled once, then retried
    assert max_in_window(counter.times, 1.0) <= 1 + 2
    assert clock.now - 1000.0 == pytest.approx(9 / 2)


def test_max_requests_per_second_builds_a_bucket(moto_url):
    kms = AwsKms(region="us-east-1", endpoint_url=moto_url, max_requests_per_second=25)
    assert kms.rate_limiter is not None and kms.rate_limiter.rate == 25 and kms.rate_limiter.burst == 25
    assert "25/s" in repr(kms)
    kms.close()
    with pytest.raises(ValueError):
        AwsKms(region="us-east-1", endpoint_url=moto_url, max_requests_per_second=5, rate_limiter=TokenBucket(5))
