"""Rotation as a control-plane operation on AWS: `keyturn.rotation.rewrap` over an S3 lake, in moto.

The lake is encrypted under AWS KMS (key A) with the registry in DynamoDB:
every DEK registered in the registry's DEK directory before its cells are
sealed, the dataset contract pinned, several DEKs per file. Rotating onto
key B and re-wrapping moves every directory entry with one KMS ReEncrypt per
DEK (the DEK never enters this process) and a compare-and-set on the entry,
and changes not one S3 object. Proved here, every call over HTTP to the
loopback moto server (tests/aws_support.py):

- under ~30% injected ThrottlingException, every S3 object keeps its key,
  ETag and LastModified (and the server answered no S3 write), every entry
  lands on the new version, successful ReEncrypt requests (counted at the
  client and at the server) == DEKs, every file decrypts to the source, and
  a second rewrap makes no KMS request at all;
- a KMS outage after K successes raises a `KmsError`, leaves every DEK
  readable on its old or new wrapping, and a rerun finishes without
  re-wrapping a DEK twice;
- a SIGKILL between a ReEncrypt and its swap (a subprocess) loses nothing,
  and a rerun finishes;
- two concurrent rewraps never overwrite each other;
- retiring the old version is refused until the rewrap finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from aws_support import (  # noqa: F401  (moto_url is a fixture)
    AttemptCounter,
    FaultInjector,
    client,
    moto_url,
    new_kms_key,
    requests_seen,
    shorten_backoff,
    unique,
)

from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.audit.chain import AuditChain, verify_chain
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.aws.kms import AwsKms
from keyturn.contract import settle_arrow_contract
from keyturn.errors import KmsError, KmsUnavailableError, VersionInUseError
from keyturn.lake import Lake, footer_for, write_parquet_atomically
from keyturn.lake.footer import dek_counts
from keyturn.policy import KeyPolicy
from keyturn.reader import DekReader
from keyturn.registry.base import KeyState
from keyturn.rotation import retire, rewrap
from keyturn.scope import DekScope, Location, ScopeLimits

pytestmark = pytest.mark.aws

DATASET = "customers"
SENSITIVE = ["email", "ssn"]
WHO = {"actor": "tests", "reason": "aws rewrap"}
PARTITIONS, FILES_PER_PARTITION, ROWS = 4, 2, 240
LIMITS = ScopeLimits(max_cells=20)  # a fresh DEK every ~10 rows: several DEKs per file


def source_table() -> pa.Table:
    ids = np.arange(ROWS, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "region": (ids % PARTITIONS).astype(np.int64),
            "email": [f"user{i}@example.com" for i in ids],
            "ssn": [None if i % 17 == 0 else f"{i:03d}-{i % 97:02d}-{i % 9973:04d}" for i in ids],
            "spend": np.round(np.linspace(1, 500, ROWS), 2),
        }
    )


def object_states(s3, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def s3_writes() -> int:
    """Mutating REST requests the server answered so far (S3 is the only REST service here; the rest are JSON targets)."""
    return sum(requests_seen(method) for method in ("PUT", "POST", "DELETE"))


def reencrypts_seen() -> int:
    """KMS ReEncrypt requests the server answered (injected faults never reach it)."""
    return requests_seen("TrentService.ReEncrypt")


@pytest.fixture(scope="module")
def keys(moto_url):
    admin = client("kms", moto_url)
    return new_kms_key(admin), new_kms_key(admin)


@pytest.fixture
def world(moto_url, keys, tmp_path):
    """An S3 lake encrypted under key A (version 1), every DEK in the DynamoDB registry's directory."""
    key_a, key_b = keys
    s3 = client("s3", moto_url)
    bucket = unique("keyturn-rewrap")
    s3.create_bucket(Bucket=bucket)
    fs = pafs.S3FileSystem(
        endpoint_override=moto_url.split("//", 1)[1], scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1",
    )
    lake = Lake(f"{bucket}/lake", filesystem=fs)
    table = unique("keyturn-rewrap-registry")
    create_table(table, client=client("dynamodb", moto_url))
    registry = DynamoDbKeyRegistry(table, client=client("dynamodb", moto_url))
    registry.initialize(key_a["Arn"], **WHO)
    source = source_table()
    with AwsKms(client=client("kms", moto_url)) as kms:
        encrypt_lake(lake, kms, registry, source)
    n_deks = registry.dek_count(1)
    assert registry.deks_by_version() == {1: n_deks} and n_deks >= 3 * len(lake.data_files())
    return {
        "url": moto_url, "s3": s3, "bucket": bucket, "lake": lake, "registry": registry, "table": table,
        "keys": keys, "source": source, "deks": n_deks, "chain": AuditChain(str(tmp_path / "audit.log")),
        "log": str(tmp_path / "audit.log"),
    }


def encrypt_lake(lake: Lake, kms: AwsKms, registry, table: pa.Table) -> None:
    contract = settle_arrow_contract(registry, DATASET, table.drop_columns(["region"]).schema, SENSITIVE, actor="tests")
    policy = KeyPolicy.from_registry(registry)
    for region in range(PARTITIONS):
        part = table.filter(pc.equal(table["region"], region)).drop_columns(["region"])
        partition = f"region={region}"
        step = -(-part.num_rows // FILES_PER_PARTITION)
        for start in range(0, part.num_rows, step):
            chunk = part.slice(start, step).combine_chunks().to_batches()[0]
            with DekScope(
                kms, policy.active, Location(DATASET, partition), limits=LIMITS, directory=registry,
                contract_revision=contract.revision,
            ) as scope:
                sealed = encrypt_batch(chunk, SENSITIVE, scope)
            footer = footer_for(
                DATASET, partition, {policy.active.version: sealed.num_rows}, sealed.num_rows, SENSITIVE, dek_counts(sealed)
            )
            write_parquet_atomically(lake, lake.new_data_path(partition), sealed, footer)


def rotate_to_key_b(world) -> None:
    world["registry"].rotate(world["keys"][1]["Arn"], **WHO)


def assert_lake_reads_as_source(world, *, current: int | None = None) -> Counter:
    """Decrypt every file through the directory and the contract (a clean KMS client): each equals the source."""
    lake, registry, source = world["lake"], world["registry"], world["source"]
    policy, contract = KeyPolicy.from_registry(registry), registry.get_contract(DATASET)
    by_id = {row["id"]: row for row in source.to_pylist()}
    statuses: Counter = Counter()
    seen: list[int] = []
    with AwsKms(client=client("kms", world["url"])) as kms, DekReader(kms, directory=registry) as reader:
        for f in lake.data_files():
            with lake.fs.open_input_file(f.path) as handle:
                data = pq.read_table(handle)
            region = int(f.partition.split("=")[1])
            for batch in data.to_batches():
                result = decrypt_batch(batch, reader, policy, Location(DATASET, f.partition), contract=contract)
                statuses.update(result.counts())
                for row in result.plain.to_pylist():
                    want = by_id[row["id"]]
                    assert (row["email"], row["ssn"], row["spend"], region) == (
                        want["email"], want["ssn"], want["spend"], want["region"]
                    )
                    seen.append(row["id"])
    assert sorted(seen) == list(range(ROWS))  # every row exactly once
    assert statuses["corrupt"] == statuses["unknown"] == statuses["retired"] == statuses["missing"] == 0
    if current is not None:
        assert statuses["current"] == current
    return statuses


def entries_by_version(registry) -> dict[int, int]:
    """Directory entries per key version, counted from the entries themselves (not the counters)."""
    return dict(Counter(e.key_version for e in registry.list_deks()))


# --------------------------------------------------------------------------- throttled rewrap


def test_throttled_rewrap_moves_every_dek_and_no_s3_object(world):
    registry, s3, bucket, n = world["registry"], world["s3"], world["bucket"], world["deks"]
    key_a, key_b = world["keys"]
    rotate_to_key_b(world)
    assert_lake_reads_as_source(world, current=0)  # every row stale: its DEK is still under version 1

    kms_client = client("kms", world["url"], max_attempts=10)
    assert shorten_backoff(kms_client)
    attempts = AttemptCounter(kms_client)
    injector = FaultInjector.rate(kms_client, code="ThrottlingException", fraction=0.3, seed=7)
    before, writes, seen = object_states(s3, bucket), s3_writes(), reencrypts_seen()
    assert writes > 0 and len([k for k in before if k.endswith(".parquet")]) == PARTITIONS * FILES_PER_PARTITION

    started = time.perf_counter()
    with AwsKms(client=kms_client) as kms:
        report = rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    elapsed = time.perf_counter() - started
    assert (report["deks_moved"], report["deks_raced"], report["deks_failed"]) == (n, 0, [])
    assert (report["kms_calls"], report["complete"], report["lake_bytes_written"]) == (n, True, 0)
    assert report["from_versions"] == [1] and report["remaining"] == {"1": 0}

    # the throttling really happened, every throttled attempt was retried, and each DEK was re-wrapped exactly once
    assert injector.injected_by_operation["ReEncrypt"] > 0.15 * attempts.by_operation["ReEncrypt"]
    assert attempts.by_operation["ReEncrypt"] - injector.injected_by_operation["ReEncrypt"] == n  # at the client
    assert reencrypts_seen() - seen == n  # at the server
    assert set(attempts.by_operation) == {"ReEncrypt"}  # no Decrypt, no GenerateDataKey: the DEK never left KMS

    # not one S3 object changed: same keys, ETags and LastModified, and the server answered no S3 write
    assert object_states(s3, bucket) == before and s3_writes() == writes

    # every entry is on version 2, wrapped under key B, by the counters and by the entries themselves
    assert registry.deks_by_version() == {2: n} == entries_by_version(registry)
    assert {e.parsed().kek_id for e in registry.list_deks()} == {key_b["Arn"]}
    assert {e.birth_version for e in registry.list_deks()} == {1}
    assert registry.list_deks(key_version=1) == [] and len(registry.list_deks(key_version=2)) == n
    assert_lake_reads_as_source(world, current=ROWS)

    # one control-plane event with the counts and every ReEncrypt's request id
    (entry,) = world["chain"].entries()
    event = entry.event
    assert (event.action.value, event.version_from, event.version_to) == ("rewrap", 1, 2)
    assert event.counts["deks_moved"] == event.counts["kms_calls"] == n and len(event.kms_request_ids) == n
    assert verify_chain(world["log"]) == 1

    # a second rewrap has nothing to do: no KMS request at all (client and server), nothing logged
    total_attempts, seen = attempts.total, requests_seen("TrentService.")
    with AwsKms(client=kms_client) as kms:
        again = rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert (again["deks_moved"], again["kms_calls"], again["complete"]) == (0, 0, True) and "audit_event" not in again
    assert attempts.total == total_attempts and requests_seen("TrentService.") == seen
    assert len(world["chain"].entries()) == 1
    assert object_states(s3, bucket) == before
    print(f"\nrewrap of {n} DEKs under 30% throttling: {elapsed:.2f}s, {injector.injected} throttled attempts")


# --------------------------------------------------------------------------- outage, crash, concurrency


def test_kms_outage_mid_rewrap_leaves_every_dek_readable_and_a_rerun_finishes(world):
    registry, s3, bucket, n = world["registry"], world["s3"], world["bucket"], world["deks"]
    rotate_to_key_b(world)
    k = n // 3
    kms_client = client("kms", world["url"], max_attempts=3)
    assert shorten_backoff(kms_client)
    injector = FaultInjector(kms_client, code="KMSInternalException", status=500, decide=lambda op, i: i >= k)
    before, seen = object_states(s3, bucket), reencrypts_seen()
    with AwsKms(client=kms_client) as kms, pytest.raises(KmsError) as raised:
        rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert isinstance(raised.value, KmsUnavailableError)  # an outage, never a verdict on the data
    assert injector.injected == 3  # the (k+1)-th DEK's attempts, retried, then a typed error: no hang
    assert reencrypts_seen() - seen == k

    # k DEKs on their new wrapping, the rest on their old one; every DEK readable, every row exactly once
    assert registry.deks_by_version() == {1: n - k, 2: k} == entries_by_version(registry)
    statuses = assert_lake_reads_as_source(world)
    assert statuses["current"] > 0 and statuses["stale"] > 0 and statuses["current"] + statuses["stale"] == ROWS
    assert object_states(s3, bucket) == before
    with pytest.raises(VersionInUseError):
        retire(registry, 1, world["chain"], **WHO)

    # the KMS is back: a rerun moves only what is left (no DEK re-wrapped twice) and finishes
    injector.remove()
    with AwsKms(client=kms_client) as kms:
        report = rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert (report["deks_moved"], report["kms_calls"], report["complete"]) == (n - k, n - k, True)
    assert reencrypts_seen() - seen == n
    assert registry.deks_by_version() == {2: n}
    assert_lake_reads_as_source(world, current=ROWS)
    assert object_states(s3, bucket) == before


def test_an_outage_mid_rewrap_still_audits_the_deks_it_moved(world):
    """A run that re-wrapped k DEKs before the KMS failed moved something: its event (counts, request ids) is logged.

    Otherwise the audit log never records those k ReEncrypts: the rerun's
    event counts only the DEKs that were left.
    """
    registry, n = world["registry"], world["deks"]
    rotate_to_key_b(world)
    k = n // 3
    kms_client = client("kms", world["url"], max_attempts=2)
    assert shorten_backoff(kms_client)
    injector = FaultInjector(kms_client, code="KMSInternalException", status=500, decide=lambda op, i: i >= k)
    with AwsKms(client=kms_client) as kms, pytest.raises(KmsError):
        rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    injector.remove()
    with AwsKms(client=kms_client) as kms:
        rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert registry.deks_by_version() == {2: n}
    events = [e.event for e in world["chain"].entries()]
    assert all(e.action.value == "rewrap" for e in events)
    assert sum(e.counts["deks_moved"] for e in events) == n  # every move audited, across the two runs
    assert sum(len(e.kms_request_ids) for e in events) == n


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from keyturn.audit.chain import AuditChain
    from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry
    from keyturn.aws.kms import AwsKms
    from keyturn.rotation import rewrap

    url, table, log = sys.argv[1:4]
    registry = DynamoDbKeyRegistry(table, endpoint_url=url, region="us-east-1")
    with AwsKms(endpoint_url=url, region="us-east-1") as kms:
        rewrap(registry, kms, AuditChain(log), actor="tests", reason="crash", dataset="customers")
    print("finished without crashing")
    """
)


def test_sigkill_between_reencrypt_and_swap_loses_nothing_and_a_rerun_finishes(world):
    registry, s3, bucket, n = world["registry"], world["s3"], world["bucket"], world["deks"]
    rotate_to_key_b(world)
    k = n // 2
    before, seen = object_states(s3, bucket), reencrypts_seen()
    env = {**os.environ, "KEYTURN_CRASHPOINT": "rewrap:before-swap", "KEYTURN_CRASHPOINT_SKIP": str(k)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, world["url"], world["table"], world["log"]],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL with the (k+1)-th DEK re-wrapped but not swapped
    assert reencrypts_seen() - seen == k + 1
    assert registry.deks_by_version() == {1: n - k, 2: k} == entries_by_version(registry)
    statuses = assert_lake_reads_as_source(world)
    assert statuses["current"] + statuses["stale"] == ROWS and statuses["stale"] > 0

    with AwsKms(client=client("kms", world["url"])) as kms:
        report = rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert (report["deks_moved"], report["complete"]) == (n - k, True)
    assert reencrypts_seen() - seen == n + 1  # the lost ReEncrypt is simply done again
    assert registry.deks_by_version() == {2: n}
    assert_lake_reads_as_source(world, current=ROWS)
    assert object_states(s3, bucket) == before


def test_two_concurrent_rewraps_never_overwrite_each_other(world, tmp_path):
    registry, n = world["registry"], world["deks"]
    rotate_to_key_b(world)
    seen = reencrypts_seen()
    # each run has its own clients, registry handle and audit log, as two operators' hosts would
    runs = [
        (DynamoDbKeyRegistry(world["table"], client=client("dynamodb", world["url"])),
         AwsKms(client=client("kms", world["url"])), AuditChain(str(tmp_path / f"audit-{i}.log")))
        for i in range(2)
    ]
    reports: list[dict] = []
    errors: list[BaseException] = []

    def run(reg, kms, chain) -> None:
        try:
            reports.append(rewrap(reg, kms, chain, **WHO, dataset=DATASET, page=4))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=r) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for _, kms, _ in runs:
        kms.close()
    assert not errors and len(reports) == 2
    assert sum(r["deks_moved"] for r in reports) == n  # each DEK swapped by exactly one of the two
    assert sum(r["kms_calls"] for r in reports) == n + sum(r["deks_raced"] for r in reports) == reencrypts_seen() - seen
    assert registry.deks_by_version() == {2: n} == entries_by_version(registry)
    assert_lake_reads_as_source(world, current=ROWS)


# --------------------------------------------------------------------------- retire


def test_retire_is_refused_until_the_rewrap_finished(world):
    registry, chain, n = world["registry"], world["chain"], world["deks"]
    rotate_to_key_b(world)
    with pytest.raises(VersionInUseError, match=rf"holds {n} DEK"):
        retire(registry, 1, chain, **WHO)
    with AwsKms(client=client("kms", world["url"])) as kms:
        first = rewrap(registry, kms, chain, **WHO, dataset=DATASET, max_deks=n - 2)
        assert (first["deks_moved"], first["complete"], first["remaining"]) == (n - 2, False, {"1": 2})
        with pytest.raises(VersionInUseError, match=r"holds 2 DEK"):  # two DEKs still under version 1
            retire(registry, 1, chain, **WHO)
        assert registry.get(1).state is KeyState.DECRYPT_ONLY
        second = rewrap(registry, kms, chain, **WHO, dataset=DATASET)
        assert (second["deks_moved"], second["complete"]) == (2, True)
    assert retire(registry, 1, chain, **WHO).state is KeyState.RETIRED  # no lake, no inventory: the directory decides
    assert registry.get(1).state is KeyState.RETIRED
    assert_lake_reads_as_source(world, current=ROWS)  # every row's birth version is retired; the directory's is active
    assert [e.event.action.value for e in chain.entries()] == ["rewrap", "rewrap", "retire"]
    assert verify_chain(world["log"]) == 3
