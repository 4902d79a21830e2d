"""The S3 lake lock (a lease object written with conditional PUTs) and S3 lake settings, on moto's server.

moto honours ``If-None-Match: *`` and ``If-Match`` on PutObject and
``If-Match`` on DeleteObject (checked here through boto3), which is what the
lock's compare-and-swap relies on. Lease expiry is driven by injected clocks,
never by waiting, except where the renewal thread itself is under test (it
waits for the thread's renewals to be counted, not for a time).
"""

from __future__ import annotations

import json
import pickle
import threading
import time

import pyarrow as pa
import pytest
from aws_support import client, moto_url, unique  # noqa: F401  (moto_url is a fixture)
from botocore.exceptions import ClientError

from keyturn.errors import LakeError, LakeLockedError, LakeLockLostError
from keyturn.lake import Lake, S3Settings, write_parquet_atomically
from keyturn.lake.s3lock import S3LeaseLock

pytestmark = pytest.mark.aws


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def bucket(moto_url):
    s3 = client("s3", moto_url)
    name = unique("keyturn-lock")
    s3.create_bucket(Bucket=name)
    return s3, name


def s3_lake(moto_url, name, prefix="lake"):
    return Lake(f"s3://{name}/{prefix}", s3=S3Settings.from_endpoint_url(moto_url))


def lock_object(s3, name, prefix="lake"):
    try:
        return json.loads(s3.get_object(Bucket=name, Key=f"{prefix}/_keyturn/lock")["Body"].read())
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchKey":
            return None
        raise


def test_moto_honours_the_conditional_writes_the_lock_relies_on(bucket):
    s3, name = bucket
    etag = s3.put_object(Bucket=name, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError) as created_twice:
        s3.put_object(Bucket=name, Key="k", Body=b"2", IfNoneMatch="*")
    assert created_twice.value.response["Error"]["Code"] == "PreconditionFailed"
    newer = s3.put_object(Bucket=name, Key="k", Body=b"2", IfMatch=etag)["ETag"]
    with pytest.raises(ClientError) as stale_write:
        s3.put_object(Bucket=name, Key="k", Body=b"3", IfMatch=etag)
    assert stale_write.value.response["Error"]["Code"] == "PreconditionFailed"
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=name, Key="k", IfMatch=etag)
    s3.delete_object(Bucket=name, Key="k", IfMatch=newer)
    assert s3.list_objects_v2(Bucket=name)["KeyCount"] == 0


def test_exclusive_refuses_everyone_then_releases(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    with lake.lock(exclusive=True, owner="reencrypt run-1") as held:
        assert isinstance(held, S3LeaseLock) and held.held
        doc = lock_object(s3, name)
        assert [(h["owner"], h["mode"]) for h in doc["holders"]] == [("reencrypt run-1", "exclusive")]
        assert doc["holders"][0]["expires"] > doc["holders"][0]["since"]
        for exclusive in (True, False):
            with pytest.raises(LakeLockedError, match="locked by another keyturn job.*reencrypt run-1"):
                lake.lock(exclusive=exclusive, owner="other").acquire()
    assert lock_object(s3, name) is None  # the last holder out deletes the lease object
    with lake.lock(exclusive=True):
        pass


def test_shared_holders_coexist_and_keep_an_exclusive_out(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    a = lake.lock(exclusive=False, owner="encrypt a").acquire()
    b = lake.lock(exclusive=False, owner="decrypt b").acquire()
    assert sorted(h["owner"] for h in lock_object(s3, name)["holders"]) == ["decrypt b", "encrypt a"]
    with pytest.raises(LakeLockedError, match="encrypt a|decrypt b"):
        lake.lock(exclusive=True).acquire()
    a.release()
    assert [h["owner"] for h in lock_object(s3, name)["holders"]] == ["decrypt b"]
    with pytest.raises(LakeLockedError):
        lake.lock(exclusive=True).acquire()
    b.release()
    assert lock_object(s3, name) is None
    lake.lock(exclusive=True).acquire().release()


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    clock = Clock()
    crashed = S3LeaseLock(lake, exclusive=True, owner="crashed job", lease_seconds=60, renew_every=59, clock=clock)
    crashed.acquire()
    clock.now += 30
    with pytest.raises(LakeLockedError, match="crashed job"):  # still live
        S3LeaseLock(lake, exclusive=True, owner="next", lease_seconds=60, clock=clock).acquire()
    clock.now += 31  # 61 s after acquiring, never renewed: expired
    taker = S3LeaseLock(lake, exclusive=True, owner="next", lease_seconds=60, clock=clock).acquire()
    assert [h["owner"] for h in taker.taken_over] == ["crashed job"]
    assert [h["owner"] for h in lock_object(s3, name)["holders"]] == ["next"]
    with pytest.raises(LakeLockLostError, match="lost"):
        crashed.renew()
    with pytest.raises(LakeLockLostError):
        crashed.release()  # the job that lost its lease does not end as a success
    assert [h["owner"] for h in lock_object(s3, name)["holders"]] == ["next"]  # and it removed nothing
    taker.release()
    assert lock_object(s3, name) is None


def test_renewal_keeps_a_long_job_locked(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    clock = Clock()
    job = S3LeaseLock(lake, exclusive=True, owner="long job", lease_seconds=60, renew_every=59, clock=clock).acquire()
    for _ in range(3):  # three lease lengths pass, renewed each time
        clock.now += 50
        job.renew()
        with pytest.raises(LakeLockedError, match="long job"):
            S3LeaseLock(lake, exclusive=False, owner="reader", lease_seconds=60, clock=clock).acquire()
    assert lock_object(s3, name)["holders"][0]["expires"] == clock.now + 60
    job.release()


def test_the_renewal_thread_renews_while_held(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    job = S3LeaseLock(lake, exclusive=True, owner="threaded", lease_seconds=30, renew_every=0.05).acquire()
    first = lock_object(s3, name)["holders"][0]["expires"]
    deadline = time.monotonic() + 30
    while job.renewals < 3 and time.monotonic() < deadline:  # wait for the event, not for a duration
        time.sleep(0.02)
    assert job.renewals >= 3
    assert lock_object(s3, name)["holders"][0]["expires"] > first
    job.release()
    count = job.renewals
    assert lock_object(s3, name) is None and job.renewals == count  # the thread stopped with the release


def test_racing_exclusive_acquirers_one_wins(moto_url, bucket):
    s3, name = bucket
    lake = s3_lake(moto_url, name)
    barrier = threading.Barrier(6)
    won: list[S3LeaseLock] = []
    refused: list[Exception] = []

    def contend(i: int) -> None:
        lock = S3LeaseLock(lake, exclusive=True, owner=f"job {i}")
        barrier.wait()
        try:
            won.append(lock.acquire())
        except LakeLockedError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert [h["owner"] for h in lock_object(s3, name)["holders"]] == [won[0].owner]
    won[0].release()


def test_a_damaged_lock_object_is_reported_not_overwritten(moto_url, bucket):
    s3, name = bucket
    s3.put_object(Bucket=name, Key="lake/_keyturn/lock", Body=b"not json")
    with pytest.raises(LakeError, match="not a keyturn lease document"):
        s3_lake(moto_url, name).lock().acquire()
    assert s3.get_object(Bucket=name, Key="lake/_keyturn/lock")["Body"].read() == b"not json"


# --------------------------------------------------------------------------- S3 settings and pickling


def test_s3_uri_lake_pickles_its_endpoint_not_the_workers_environment(moto_url, bucket, monkeypatch):
    """A lake built on the driver keeps its endpoint when unpickled where the environment names another."""
    _, name = bucket
    lake = Lake(f"s3://{name}/lake", s3=S3Settings.from_endpoint_url(moto_url, region="us-east-1"))
    assert lake.root == f"{name}/lake" and lake.is_s3
    write_parquet_atomically(lake, lake.new_data_path("region=1"), pa.table({"id": [1, 2]}), None)
    blob = pickle.dumps(lake)
    assert b"testing" not in blob  # no credential travels with the lake
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # a worker whose environment points elsewhere
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clone = pickle.loads(blob)
    assert clone.s3 == lake.s3 and [f.relpath for f in clone.data_files()] == [f.relpath for f in lake.data_files()]


def test_s3_settings_resolution(moto_url, monkeypatch):
    host = moto_url.split("//", 1)[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert Lake("s3://b-1/x").s3 == S3Settings("127.0.0.1:1111", "http")  # the standard variable
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://127.0.0.1:2222")
    assert Lake("s3://b-1/x").s3 == S3Settings("127.0.0.1:2222", "https")  # the S3-specific one wins
    given = S3Settings.from_endpoint_url(moto_url)
    assert Lake("s3://b-1/x", s3=given).s3 == given  # explicit settings beat the environment
    lake = Lake(f"s3://b-1/x/?endpoint_override={host}&scheme=http&region=eu-west-1", s3=given)
    assert lake.s3 == S3Settings(host, "http", "eu-west-1") and lake.root == "b-1/x"  # the URI's query wins
    with pytest.raises(ValueError, match="unsupported query"):
        Lake("s3://b-1/x?access_key=AKIA")
    with pytest.raises(ValueError):
        S3Settings.from_endpoint_url("127.0.0.1:9000")
