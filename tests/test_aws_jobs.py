"""Whole jobs on AwsKms against moto: codec round trips, both rotation models, throttling, an outage, the call budget.

A "job" here is the core loop a pipeline runs per partition: one `DekScope`
per partition (and bundle) to encrypt, one `DekReader` per partition to
decrypt, `rewrap_batch` after a rotation. Output for a partition is kept only
once the whole partition succeeded, so a failed run leaves whole partitions
or nothing, and a rerun does only what is missing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pytest
from aws_support import (  # noqa: F401  (moto_url is a fixture)
    AttemptCounter,
    FaultInjector,
    client,
    moto_url,
    new_kms_key,
    shorten_backoff,
    start_moto,
    unique,
)

from keyturn.arrow_codec import decrypt_batch, encrypt_batch, rewrap_batch
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.aws.kms import AwsKms
from keyturn.errors import KmsAccessDeniedError, KmsUnavailableError
from keyturn.kms.base import CountingKms, KmsBackend
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reader import DekReader
from keyturn.scope import DekScope, KekRef, Location

pytestmark = pytest.mark.aws

DATASET = "customers"
WHO = {"actor": "tests", "reason": "aws job"}


def partitions(n_parts: int, rows_per_part: int) -> dict[str, pa.RecordBatch]:
    """Partition name -> batch with a unique int64 `id`, a short string `ssn` (some nulls) and a clear `city`."""
    out = {}
    for p in range(n_parts):
        ids = np.arange(p * rows_per_part, (p + 1) * rows_per_part, dtype=np.int64)
        ssn = pa.array([None if i % 17 == 0 else f"{i:09d}" for i in ids.tolist()], pa.string())
        out[f"region={p}"] = pa.record_batch({"id": ids, "ssn": ssn, "city": pa.array([f"c{i % 7}" for i in ids.tolist()])})
    return out


def encrypt_job(kms: KmsBackend, kek: KekRef, parts: Mapping[str, pa.RecordBatch], out: dict, *, bundles: int = 1) -> None:
    """Encrypt every partition not yet in `out`: one DekScope per partition bundle."""
    for name, batch in parts.items():
        if name in out:
            continue
        location = Location(DATASET, name)
        step = -(-batch.num_rows // bundles)
        sealed = []
        for start in range(0, batch.num_rows, step):
            with DekScope(kms, kek, location) as scope:
                sealed.append(encrypt_batch(batch.slice(start, step), ["ssn"], scope))
        out[name] = sealed  # only a whole partition is kept


def decrypt_job(kms: KmsBackend, policy: KeyPolicy, enc: Mapping[str, list[pa.RecordBatch]]) -> dict[str, list[pa.RecordBatch]]:
    """Decrypt every partition with one DekReader per partition; every row must be readable."""
    plain = {}
    for name, batches in enc.items():
        with DekReader(kms) as reader:
            results = [decrypt_batch(b, reader, policy, Location(DATASET, name)) for b in batches]
        for r in results:
            assert all(s.readable for s in r.status), r.counts()
        plain[name] = [r.plain for r in results]
    return plain


def rewrap_job(kms: KmsBackend, policy: KeyPolicy, enc: Mapping[str, list[pa.RecordBatch]]) -> dict[str, list[pa.RecordBatch]]:
    out = {}
    for name, batches in enc.items():
        out[name] = [rewrap_batch(b, kms, policy, Location(DATASET, name)).batch for b in batches]
    return out


def assert_same_rows(parts: Mapping[str, pa.RecordBatch], plain: Mapping[str, list[pa.RecordBatch]]) -> None:
    """Every input row comes back exactly once, in its partition, with its values."""
    assert set(plain) == set(parts)
    for name, batch in parts.items():
        got = pa.Table.from_batches(plain[name]).combine_chunks()
        assert got.num_rows == batch.num_rows
        ids = Counter(got.column("id").to_pylist())
        assert all(c == 1 for c in ids.values()) and set(ids) == set(batch.column("id").to_pylist())
        assert got.sort_by("id").select(["id", "ssn", "city"]).equals(pa.Table.from_batches([batch]))


@pytest.fixture(scope="module")
def keys(moto_url):
    admin = client("kms", moto_url)
    return new_kms_key(admin, alias=unique("alias/keyturn-jobs")), new_kms_key(admin)


@pytest.fixture
def registry(moto_url):
    table = unique("keyturn-jobs")
    create_table(table, client=client("dynamodb", moto_url))
    return DynamoDbKeyRegistry(table, client=client("dynamodb", moto_url))


# --------------------------------------------------------------------------- round trips and rotation


def test_scope_encrypt_decrypt_rewrap_round_trip(moto_url, keys, registry):
    key_a, key_b = keys
    kms_client = client("kms", moto_url)
    kms = CountingKms(AwsKms(client=kms_client))
    registry.initialize(key_a["Arn"], **WHO)
    parts = partitions(3, 200)
    enc: dict = {}
    encrypt_job(kms, KekRef(1, key_a["Arn"]), parts, enc)
    assert kms.calls.generate == 3
    policy_v1 = KeyPolicy.from_registry(registry)
    assert_same_rows(parts, decrypt_job(kms, policy_v1, enc))
    assert kms.calls.decrypt == 3

    registry.rotate(key_b["KeyId"], **WHO)  # the new-key-per-version model
    policy_v2 = KeyPolicy.from_registry(registry)
    with DekReader(kms) as reader:
        stale = decrypt_batch(enc["region=0"][0], reader, policy_v2, Location(DATASET, "region=0"))
    assert stale.counts()["stale"] == 200
    moved = rewrap_job(kms, policy_v2, enc)
    assert kms.calls.rewrap == 3
    for name in enc:
        before, after = enc[name][0], moved[name][0]
        assert after.column("ssn").equals(before.column("ssn"))  # payload bytes untouched
        assert set(after.column("_keyturn_version").to_pylist()) == {2}
    calls_before = kms.calls.decrypt
    assert_same_rows(parts, decrypt_job(kms, policy_v2, moved))
    assert kms.calls.decrypt == calls_before + 3
    with DekReader(kms) as reader:  # a rewrapped DEK is bound to version 2: the old policy cannot read it
        wrong = decrypt_batch(moved["region=0"][0], reader, policy_v1, Location(DATASET, "region=0"))
    assert wrong.counts()["unknown"] == 200


def test_kms_rotation_model_versions_share_one_key(moto_url, keys, registry):
    """KMS rotates material under one key id; registry versions 1 and 2 both name it."""
    key_a, _ = keys
    alias = client("kms", moto_url).list_aliases(KeyId=key_a["KeyId"])["Aliases"][0]["AliasName"]
    kms = CountingKms(AwsKms(client=client("kms", moto_url)))
    registry.initialize(alias, **WHO)
    parts = partitions(2, 100)
    enc: dict = {}
    encrypt_job(kms, KekRef(1, alias), parts, enc)
    kms.inner.rotate_key_material(alias)
    v2 = registry.rotate(alias, **WHO)
    assert v2.kek_id == registry.get(1).kek_id == alias
    policy = KeyPolicy.from_registry(registry)
    assert policy.classify(1) is ReadStatus.STALE
    moved = rewrap_job(kms, policy, enc)  # ReEncrypt from the key to itself, into version 2's context
    assert kms.calls.rewrap == 2
    assert_same_rows(parts, decrypt_job(kms, policy, moved))
    fresh: dict = {}
    encrypt_job(kms, policy.active, parts, fresh)
    assert_same_rows(parts, decrypt_job(kms, policy, fresh))


def test_moved_cell_fails_on_aws_too(moto_url, keys):
    key_a, _ = keys
    kms = AwsKms(client=client("kms", moto_url))
    parts = partitions(2, 50)
    enc: dict = {}
    encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc)
    policy = KeyPolicy.from_versions([_version(1, key_a["KeyId"])])
    with DekReader(kms) as reader:  # partition 0's rows read as if they were in partition 1
        result = decrypt_batch(enc["region=0"][0], reader, policy, Location(DATASET, "region=1"))
    assert result.counts()["corrupt"] == 50 and result.plain.num_rows == 0


# --------------------------------------------------------------------------- throttling


def test_throttled_job_completes_with_bounded_calls(moto_url, keys, registry):
    """30% of KMS attempts answer ThrottlingException; botocore retries; nothing is lost or doubled."""
    key_a, key_b = keys
    max_attempts = 8
    kms_client = client("kms", moto_url, max_attempts=max_attempts)
    shorten_backoff(kms_client)
    kms = CountingKms(AwsKms(client=kms_client))
    attempts = AttemptCounter(kms_client)
    injector = FaultInjector.rate(kms_client, code="ThrottlingException", fraction=0.3, seed=20240101)
    registry.initialize(key_a["KeyId"], **WHO)
    parts = partitions(10, 300)
    scopes = len(parts)

    enc: dict = {}
    encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc)
    assert_same_rows(parts, decrypt_job(kms, KeyPolicy.from_registry(registry), enc))
    registry.rotate(key_b["KeyId"], **WHO)
    policy = KeyPolicy.from_registry(registry)
    moved = rewrap_job(kms, policy, enc)
    assert_same_rows(parts, decrypt_job(kms, policy, moved))

    logical = kms.calls.total
    assert (kms.calls.generate, kms.calls.decrypt, kms.calls.rewrap) == (scopes, 2 * scopes, scopes)
    assert injector.injected > 0.15 * attempts.total  # the throttling really happened
    # Each throttled attempt cost exactly one more attempt; nothing failed for good.
    assert attempts.total == logical + injector.injected
    assert attempts.total <= logical * max_attempts
    for op, n in {"GenerateDataKey": scopes, "Decrypt": 2 * scopes, "ReEncrypt": scopes}.items():
        assert attempts.by_operation[op] == n + injector.injected_by_operation[op] <= n * max_attempts


def test_throttling_past_the_budget_fails_the_partition_not_the_data(moto_url, keys):
    key_a, _ = keys
    kms_client = client("kms", moto_url, max_attempts=3)
    shorten_backoff(kms_client)
    kms = AwsKms(client=kms_client)
    parts = partitions(4, 50)
    enc: dict = {}
    injector = FaultInjector(kms_client, code="ThrottlingException", decide=lambda op, i: 3 <= i < 6)
    from keyturn.errors import KmsThrottledError

    with pytest.raises(KmsThrottledError):
        encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc)
    assert list(enc) == ["region=0", "region=1", "region=2", "region=3"][: len(enc)] and len(enc) == 3
    assert injector.injected == 3  # the fourth partition's three attempts
    encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc)  # the rerun does only the missing partition
    assert len(enc) == 4 and injector.attempts == 7


# --------------------------------------------------------------------------- outage


def test_kms_outage_mid_job_then_restart_and_rerun(moto_url, keys):
    key_a, _ = keys
    server, url = start_moto()
    port = int(url.rsplit(":", 1)[1])
    kms = CountingKms(AwsKms(region="us-east-1", endpoint_url=url, max_attempts=2, connect_timeout=0.5, read_timeout=2))
    attempts = AttemptCounter(kms.inner.client)
    parts = partitions(10, 100)
    kek = KekRef(1, key_a["KeyId"])
    first_half = {name: parts[name] for name in list(parts)[:4]}
    enc: dict = {}
    try:
        encrypt_job(kms, kek, first_half, enc)
        server.stop()  # the KMS goes away mid-job
        before = attempts.total
        with pytest.raises(KmsUnavailableError):
            encrypt_job(kms, kek, parts, enc)
        assert attempts.total - before == 2  # max_attempts, then a typed error: no hang
        assert sorted(enc) == sorted(first_half)  # finished partitions kept, the failed one left nothing
        server, url_again = start_moto(port)  # the KMS comes back (same address, same keys)
        assert url_again == url
        encrypt_job(kms, kek, parts, enc)
    finally:
        server.stop()
    assert kms.calls.generate == len(parts)  # one DEK per partition, none wasted on the outage
    policy = KeyPolicy.from_versions([_version(1, key_a["KeyId"])])
    assert_same_rows(parts, decrypt_job(AwsKms(client=client("kms", moto_url)), policy, enc))


def test_disabled_kek_mid_job_stops_with_access_denied(moto_url, keys):
    """moto still decrypts with a disabled key, so DisabledException is injected from partition 3 on."""
    key_a, _ = keys
    kms_client = client("kms", moto_url)
    kms = AwsKms(client=kms_client)
    parts = partitions(5, 40)
    enc: dict = {}
    encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc)
    injector = FaultInjector(kms_client, code="DisabledException", decide=lambda op, i: i >= 2)
    policy = KeyPolicy.from_versions([_version(1, key_a["KeyId"])])
    with pytest.raises(KmsAccessDeniedError):
        decrypt_job(kms, policy, enc)
    assert injector.attempts == 3 and injector.injected == 1  # not retried, not quarantined


# --------------------------------------------------------------------------- call budget


def test_million_rows_ten_partitions_stay_within_partitions_times_bundles(moto_url, keys):
    key_a, _ = keys
    kms_client = client("kms", moto_url)
    kms = CountingKms(AwsKms(client=kms_client))
    attempts = AttemptCounter(kms_client)
    n_parts, bundles, rows = 10, 2, 1_000_000
    parts = {}
    for p in range(n_parts):
        ids = np.arange(p * rows // n_parts, (p + 1) * rows // n_parts, dtype=np.int64)
        parts[f"region={p}"] = pa.record_batch({"id": ids, "ssn": pa.array(np.char.mod("%06d", ids % 1_000_000).astype(object), pa.string())})
    enc: dict = {}
    encrypt_job(kms, KekRef(1, key_a["KeyId"]), parts, enc, bundles=bundles)
    assert kms.calls.generate == attempts.total == n_parts * bundles
    assert kms.calls.decrypt == kms.calls.rewrap == 0
    total = sum(b.num_rows for batches in enc.values() for b in batches)
    assert total == rows
    policy = KeyPolicy.from_versions([_version(1, key_a["KeyId"])])
    with DekReader(kms) as reader:
        sample = decrypt_batch(enc["region=7"][1], reader, policy, Location(DATASET, "region=7"))
    assert sample.counts()["current"] == rows // n_parts // bundles
    assert sample.plain.column("ssn").equals(parts["region=7"].slice(rows // n_parts // bundles).column("ssn"))
    assert kms.calls.decrypt == 1


def _version(number: int, kek_id: str):
    from datetime import datetime, timezone

    from keyturn.registry.base import KeyState, KeyVersion

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return KeyVersion(number, kek_id, KeyState.ACTIVE, t, "tests", "fixture", t)
