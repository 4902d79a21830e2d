"""`lifecycle.max_kms_requests_per_second` is applied once per process, on every backend.

Each test makes the process's bucket first, on a `FakeClock` that moves only
when the bucket sleeps, then opens KMS clients the way the jobs do (from the
key source the config describes) and counts: requests that reached the KMS
(the moto server's own count, or `CountingKms`), tokens taken, and waits.
Nothing reads the wall clock.
"""

from __future__ import annotations

import pickle

import pytest
from aws_support import FakeClock, client, moto_url, new_kms_key, requests_seen  # noqa: F401  (moto_url is a fixture)

from keyturn.config import parse_config
from keyturn.errors import KmsClosedError
from keyturn.keysource import LocalKeySource, key_source_from_config
from keyturn.kms.decorators import (
    DEFAULT_REQUESTS_PER_SECOND,
    CountingKms,
    RateLimitedKms,
    TokenBucket,
    process_bucket,
)
from keyturn.kms.local import LocalKms, generate_root_key_file

CTX = {"dataset": "d", "partition": "p"}


def local_source(tmp_path, rate: float) -> LocalKeySource:
    key_file = generate_root_key_file(str(tmp_path / "root.key"))
    with LocalKms.create(str(tmp_path / "keystore.json"), key_file=key_file) as kms:
        kms.create_kek("kek-1")
    cfg = parse_config({"key_hierarchy": {"cmk": {"root_key_file": "root.key"}}, "lifecycle": {"max_kms_requests_per_second": rate}})
    source = key_source_from_config(cfg, tmp_path)
    assert isinstance(source, LocalKeySource) and source.max_requests_per_second == rate
    return source


def test_the_key_sources_default_is_the_configs():
    assert parse_config({}).lifecycle.max_kms_requests_per_second == DEFAULT_REQUESTS_PER_SECOND
    assert LocalKeySource("k", "r", key_file="f").max_requests_per_second == DEFAULT_REQUESTS_PER_SECOND


def test_local_clients_of_one_process_share_one_bucket(tmp_path):
    source = local_source(tmp_path, 5)
    clock = FakeClock()
    bucket = process_bucket(source.kms_name, 5, clock=clock, sleep=clock.sleep)
    # two clients, as two DoFn instances (or a CLI command and a job) in one process would open them
    first, second = CountingKms(source.open_kms()), CountingKms(source.open_kms())
    assert first.rate_limiter is bucket and second.rate_limiter is bucket
    wrapped = [(kms, kms.generate_data_key("kek-1", CTX).wrapped) for kms in (first, second) * 5]
    for kms, w in wrapped:
        kms.decrypt("kek-1", w, CTX)
    calls = first.calls.total + second.calls.total
    assert calls == 20 and bucket.taken == 20  # one token per call: the limit ran once, not twice in series
    assert bucket.waits == 15 and clock.now - 1000.0 == pytest.approx(15 / 5)  # a burst of 5, then 5 per second
    first.close()
    second.close()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), True])
def test_a_bad_rate_is_refused_when_the_recipe_is_made(bad):
    with pytest.raises(ValueError):
        LocalKeySource("k", "r", key_file="f", max_requests_per_second=bad)


def test_no_rate_means_no_limit(tmp_path):
    source = local_source(tmp_path, 5)
    unlimited = LocalKeySource(source.keystore, source.registry, key_file=source.key_file, max_requests_per_second=None)
    with unlimited.open_kms() as kms:
        assert isinstance(kms, LocalKms) and getattr(kms, "rate_limiter", None) is None


def test_a_second_limit_in_series_is_refused(tmp_path):
    source = local_source(tmp_path, 5)
    with source.open_kms() as kms:
        with pytest.raises(ValueError, match="already rate-limited"):
            RateLimitedKms(kms, TokenBucket(5))
        with pytest.raises(ValueError, match="already rate-limited"):
            RateLimitedKms(CountingKms(kms), TokenBucket(5))  # seen through other wrappers too


def test_wrappers_pass_the_backend_through_and_refuse_pickling(tmp_path):
    source = local_source(tmp_path, 5)
    with source.open_kms() as kms:
        assert kms.has_kek("kek-1") and not kms.has_kek("kek-2")  # LocalKms's own API, through the wrapper
        assert "LocalKms" in repr(kms) and "TokenBucket(rate=5/s" in repr(kms)
        with pytest.raises(TypeError):
            pickle.dumps(kms)
    with pytest.raises(KmsClosedError):
        kms.generate_data_key("kek-1", CTX)  # closed through the wrapper


# --------------------------------------------------------------------------- AWS, against moto


@pytest.mark.aws
def test_aws_clients_of_one_process_share_one_bucket_and_each_request_takes_one_token(moto_url, tmp_path):
    key = new_kms_key(client("kms", moto_url))
    cmk = {"provider": "aws_kms", "key_id": key["KeyId"], "region": "us-east-1", "endpoint_url": moto_url}
    cfg = parse_config({
        "key_hierarchy": {"cmk": cmk},
        "version_tracking": {"storage": "sqlite", "path": "r.sqlite"},
        "lifecycle": {"max_kms_requests_per_second": 7},  # a rate no other test uses: a bucket of this test only
    })
    source = key_source_from_config(cfg, tmp_path)
    clock = FakeClock()
    bucket = process_bucket(source.kms_name, 7, clock=clock, sleep=clock.sleep)
    first, second = source.open_kms(), source.open_kms()
    assert first.rate_limiter is bucket and second.rate_limiter is bucket
    with pytest.raises(ValueError, match="already rate-limited"):
        RateLimitedKms(first, TokenBucket(7))  # what reencrypt used to stack on an AWS home
    before = requests_seen()
    wrapped = [(kms, kms.generate_data_key(key["KeyId"], CTX).wrapped) for kms in (first, second) * 6]
    for kms, w in wrapped:
        kms.decrypt(key["KeyId"], w, CTX)
    reached = requests_seen() - before
    assert reached == 24 and bucket.taken == 24  # every request that reached KMS took exactly one token
    assert bucket.waits == 24 - 7 and clock.now - 1000.0 == pytest.approx(17 / 7)
    first.close()
    second.close()
