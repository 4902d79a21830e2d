"""The lake flow (keyturn.lake, Beam-free) on an S3 lake in moto, with AWS KMS and the DynamoDB registry.

The lake is reached through ``pyarrow.fs.S3FileSystem(endpoint_override=...,
scheme="http")`` with the fake credentials, exactly as a worker would reach
a real bucket. Every DEK is registered in the registry's DEK directory and
the dataset contract is pinned, as the pipelines do. The flow: encrypt files
into a partitioned lake, take the footer-only inventory, rotate, re-wrap the
directory (KMS ReEncrypt, not one S3 write), read everything back, retire
the old version (the directory decides), rotate again and re-encrypt files
in place on S3 (`rewrite_file` only re-encrypts), write side outputs. A
re-encryption replaces each object atomically, and a crash during one, in a
separate process, must leave every row readable exactly once; a rerun
finishes. (The directory rewrap on S3 under throttling and outages is
test_aws_rewrap.py.)

A `Lake` with an injected S3 filesystem keeps it when pickled, an
``s3://`` URI with an injected filesystem is rooted at ``bucket/prefix``,
and the lake lock works on S3 (a conditional-write lease; its own tests are
in test_aws_s3_lock.py; the CLI flow on S3 is test_aws_cli_flow.py).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from aws_support import client, moto_url, new_kms_key, requests_seen, unique  # noqa: F401  (moto_url is a fixture)

from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.audit.chain import AuditChain
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.aws.kms import AwsKms
from keyturn.contract import settle_arrow_contract
from keyturn.errors import LakeLockedError, VersionInUseError
from keyturn.lake import Lake, footer_for, read_file_summary, take_inventory, write_parquet_atomically
from keyturn.lake.footer import dek_counts
from keyturn.lake.rewrite import rewrite_file
from keyturn.lake.sideoutputs import read_side_outputs, write_side_output
from keyturn.policy import KeyPolicy
from keyturn.reader import DekReader
from keyturn.rotation import rewrap
from keyturn.scope import DekScope, Location

pytestmark = pytest.mark.aws

DATASET = "customers"
SENSITIVE = ["email", "ssn"]
WHO = {"actor": "tests", "reason": "s3 lake"}


def source_table(rows: int, partitions: int) -> pa.Table:
    ids = np.arange(rows, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "region": (ids % partitions).astype(np.int64),
            "email": [f"user{i}@example.com" for i in ids],
            "ssn": [None if i % 17 == 0 else f"{i:03d}-{i % 97:02d}-{i % 9973:04d}" for i in ids],
            "spend": np.round(np.linspace(1, 500, rows), 2),
        }
    )


def s3_filesystem(url: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=url.split("//", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )


def objects(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def read_object(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def object_states(s3, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"])
    return out


def s3_writes() -> int:
    """Mutating REST requests the server answered so far (S3 is the only REST service here; the rest are JSON targets)."""
    return sum(requests_seen(method) for method in ("PUT", "POST", "DELETE"))


def contract_of(registry, table: pa.Table):
    """The dataset contract (SENSITIVE encrypted), pinned from the plain schema on first use, as the pipelines do."""
    return settle_arrow_contract(registry, DATASET, table.drop_columns(["region"]).schema, SENSITIVE, actor="tests")


def build_lake(lake: Lake, kms: AwsKms, registry, table: pa.Table, files_per_partition: int = 2) -> None:
    """Encrypt `table` into the lake under the active version; every DEK registered in the directory first."""
    policy = KeyPolicy.from_registry(registry)
    contract = contract_of(registry, table)
    for region in sorted(set(table.column("region").to_pylist())):
        part = table.filter(pc.equal(table["region"], region)).drop_columns(["region"])
        partition = f"region={region}"
        step = -(-part.num_rows // files_per_partition)
        for start in range(0, part.num_rows, step):
            chunk = part.slice(start, step).combine_chunks().to_batches()[0]
            with DekScope(
                kms, policy.active, Location(DATASET, partition), directory=registry, contract_revision=contract.revision
            ) as scope:
                sealed = encrypt_batch(chunk, SENSITIVE, scope)
            footer = footer_for(
                DATASET, partition, {policy.active.version: sealed.num_rows}, sealed.num_rows, SENSITIVE, dek_counts(sealed)
            )
            write_parquet_atomically(lake, lake.new_data_path(partition), sealed, footer, row_group_size=40)


def lake_rows(lake: Lake, kms: AwsKms, registry) -> tuple[pa.Table, Counter]:
    """Every readable row of the lake, decrypted through the directory and the contract, region restored, by id."""
    policy, contract = KeyPolicy.from_registry(registry), registry.get_contract(DATASET)
    tables, statuses = [], Counter()
    with DekReader(kms, directory=registry) as reader:
        for f in lake.data_files():
            with lake.fs.open_input_file(f.path) as handle:
                data = pq.read_table(handle)
            for batch in data.to_batches():
                result = decrypt_batch(batch, reader, policy, Location(DATASET, f.partition), contract=contract)
                statuses.update(result.counts())
                plain = pa.Table.from_batches([result.plain])
                region = int(f.partition.split("=")[1])
                plain = plain.append_column("region", pa.array([region] * plain.num_rows, pa.int64()))
                tables.append(plain.select(["id", "region", "email", "ssn", "spend"]))
    return pa.concat_tables(tables).replace_schema_metadata(None).sort_by("id"), statuses


def assert_every_row_once(lake: Lake, kms: AwsKms, registry, source: pa.Table) -> Counter:
    got, statuses = lake_rows(lake, kms, registry)
    assert Counter(got.column("id").to_pylist()) == Counter(source.column("id").to_pylist())
    assert got.cast(source.schema).equals(source.sort_by("id"))
    assert statuses["corrupt"] == statuses["unknown"] == statuses["retired"] == statuses["missing"] == 0
    return statuses


def reencrypt(lake: Lake, f, kms: AwsKms, registry):
    """`rewrite_file` the way the reencrypt job calls it: with the directory and the dataset contract."""
    return rewrite_file(
        lake, f, kms=kms, policy=KeyPolicy.from_registry(registry), dataset=DATASET, directory=registry,
        contract=registry.get_contract(DATASET),
    )


@pytest.fixture
def world(moto_url, tmp_path):
    """A bucket, an S3 filesystem, two KMS keys, a DynamoDB registry at version 1, an AwsKms and an audit chain."""
    s3 = client("s3", moto_url)
    bucket = unique("keyturn-lake")
    s3.create_bucket(Bucket=bucket)
    admin = client("kms", moto_url)
    key_a, key_b = new_kms_key(admin), new_kms_key(admin)
    table = unique("keyturn-lake-registry")
    ddb = client("dynamodb", moto_url)
    create_table(table, client=ddb)
    registry = DynamoDbKeyRegistry(table, client=ddb)
    registry.initialize(key_a["KeyId"], **WHO)
    kms = AwsKms(client=client("kms", moto_url))
    fs = s3_filesystem(moto_url)
    return {
        "url": moto_url,
        "s3": s3,
        "bucket": bucket,
        "fs": fs,
        "lake": Lake(f"{bucket}/lake", filesystem=fs),
        "keys": (key_a, key_b),
        "registry": registry,
        "table": table,
        "kms": kms,
        "chain": AuditChain(str(tmp_path / "audit.log")),
    }


# --------------------------------------------------------------------------- the flow


def test_lake_flow_on_s3(world):
    lake, kms, registry, s3, bucket = world["lake"], world["kms"], world["registry"], world["s3"], world["bucket"]
    _, key_b = world["keys"]
    source = source_table(240, 3)
    build_lake(lake, kms, registry, source)

    files = lake.data_files()
    assert len(files) == 6 and {f.partition for f in files} == {"region=0", "region=1", "region=2"}
    assert all(f.path.startswith(f"{bucket}/lake/region=") and f.size > 0 for f in files)
    keys = objects(s3, bucket)
    assert [k for k in keys if k.endswith(".parquet")] == sorted(f"lake/{f.relpath}" for f in files)
    assert lake.temp_files() == [] and not any(".keyturn-tmp-" in k for k in keys)
    assert registry.deks_by_version() == {1: 6}  # one DEK per file, registered before its cells were sealed

    # inventory from footers only
    inventory = take_inventory(lake, KeyPolicy.from_registry(registry), dataset=DATASET)
    assert [s.source for s in inventory.files] == ["footer"] * 6
    assert inventory.references(1) == 240

    # rotate onto a new KMS key and re-wrap the directory: KMS ReEncrypt per DEK, not one byte written to S3
    registry.rotate(key_b["KeyId"], **WHO)
    policy = KeyPolicy.from_registry(registry)
    assert take_inventory(lake, policy, dataset=DATASET, directory=registry).references(1) == 240
    with pytest.raises(VersionInUseError):  # the directory still wraps every DEK under version 1
        registry.retire(1, **WHO)
    before, writes, reencrypts = object_states(s3, bucket), s3_writes(), requests_seen("TrentService.ReEncrypt")
    assert writes >= 6  # the counter does see S3 writes (the six data objects, at least)
    report = rewrap(registry, kms, world["chain"], **WHO, dataset=DATASET)
    assert (report["deks_moved"], report["kms_calls"], report["complete"], report["lake_bytes_written"]) == (6, 6, True, 0)
    assert requests_seen("TrentService.ReEncrypt") - reencrypts == 6
    assert object_states(s3, bucket) == before and s3_writes() == writes  # every object: same key, ETag, LastModified
    assert registry.deks_by_version() == {2: 6}
    assert [e.event.action.value for e in world["chain"].entries()] == ["rewrap"]
    statuses = assert_every_row_once(lake, kms, registry, source)
    assert statuses["current"] == 240 and statuses["stale"] == 0  # birth version 1 in the files, version 2 in the directory
    assert {v for f in lake.data_files() for v in read_file_summary(lake, f).versions} == {1}

    # the directory no longer wraps anything under version 1: the registry lets it go, no lake needed
    inventory = take_inventory(lake, policy, dataset=DATASET, directory=registry)
    assert inventory.references(1) == 0 and inventory.references(2) == 240
    assert registry.retire(1, **WHO).state.value == "retired"
    assert_every_row_once(lake, kms, registry, source)  # retiring the birth version does not matter any more

    # re-encrypt the files in place onto version 3 (KMS rotation model: same key as version 2)
    registry.rotate(key_b["KeyId"], **WHO)
    with pytest.raises(VersionInUseError):  # version 2 still wraps every DEK
        registry.retire(2, **WHO)
    assert KeyPolicy.from_registry(registry).active.version == 3
    with pytest.raises(ValueError, match="keyturn rewrap"):  # the lake job no longer re-wraps
        rewrite_file(lake, lake.data_files()[0], kms=kms, policy=KeyPolicy.from_registry(registry), dataset=DATASET,
                     mode="rewrap")
    for f in lake.data_files():
        cells_before = pq.read_table(lake.fs.open_input_file(f.path), columns=SENSITIVE)
        out = reencrypt(lake, f, kms, registry)
        assert out.result == "rewritten" and out.audit["action"] == "reencrypt" and out.versions_after == {3: out.rows}
        assert not pq.read_table(lake.fs.open_input_file(f.path), columns=SENSITIVE).equals(cells_before)
    assert [f.relpath for f in lake.data_files()] == [f.relpath for f in files]  # same keys, replaced in place
    assert lake.temp_files() == [] and not any(".keyturn-tmp-" in k for k in objects(s3, bucket))
    statuses = assert_every_row_once(lake, kms, registry, source)
    assert statuses["current"] == 240
    assert {read_file_summary(lake, f).source for f in lake.data_files()} == {"footer"}
    assert registry.deks_by_version() == {2: 6, 3: 6}  # fresh DEKs; the old ones stay registered, unreferenced
    assert take_inventory(lake, KeyPolicy.from_registry(registry), dataset=DATASET, directory=registry).references(2) == 0

    # side outputs live under _keyturn/ in the bucket, invisible to data listings
    assert write_side_output(lake, "audit", "run-1", [out.audit]) is not None
    assert read_side_outputs(lake, "audit") == [out.audit]
    assert any(k.startswith("lake/_keyturn/audit/") for k in objects(s3, bucket))
    assert len(lake.data_files()) == 6


def test_s3_uri_with_endpoint_query_pickles_for_workers(world):
    """``s3://bucket/prefix?endpoint_override=...&scheme=http`` carries the endpoint, so Beam workers rebuild it."""
    host = world["url"].split("//", 1)[1]
    lake = Lake(f"s3://{world['bucket']}/lake?endpoint_override={host}&scheme=http")
    assert lake.root == f"{world['bucket']}/lake" and not lake.is_local
    write_parquet_atomically(lake, lake.new_data_path("region=9"), pa.table({"id": [1, 2, 3]}), None)
    clone = pickle.loads(pickle.dumps(lake))
    assert [f.relpath for f in clone.data_files()] == [f.relpath for f in lake.data_files()]
    assert len(clone.data_files()) == 1


def test_replacement_is_atomic_per_key(world, monkeypatch):
    """While a rewrite is in flight, readers of the key see the old object; after the swap, the new one."""
    lake, kms, registry, s3, bucket = world["lake"], world["kms"], world["registry"], world["s3"], world["bucket"]
    source = source_table(60, 1)
    build_lake(lake, kms, registry, source, files_per_partition=1)
    (f,) = lake.data_files()
    key = f"lake/{f.relpath}"
    old = read_object(s3, bucket, key)
    registry.rotate(world["keys"][1]["KeyId"], **WHO)

    seen: list[tuple[str, bytes, list[str]]] = []
    import keyturn.lake.rewrite as rewrite_module

    real = rewrite_module.crashpoint

    def observe(name: str) -> None:  # what another reader sees at each step of the rewrite
        seen.append((name, read_object(s3, bucket, key), objects(s3, bucket)))
        real(name)

    monkeypatch.setattr(rewrite_module, "crashpoint", observe)
    out = reencrypt(lake, f, kms, registry)  # the DEK is stale by the directory: fresh DEKs, new payload
    assert out.result == "rewritten" and out.versions_after == {2: 60}
    by_point = {name: (body, keys) for name, body, keys in seen}
    for point in ("rewrite:before-write", "rewrite:mid-write", "rewrite:before-swap"):
        assert by_point[point][0] == old  # the original is whole and untouched until the swap
    temps = [k for k in by_point["rewrite:before-swap"][1] if ".keyturn-tmp-" in k]
    assert len(temps) == 1 and temps[0].startswith("lake/region=0/.keyturn-tmp-")  # complete, hidden, next to it
    new = by_point["rewrite:after-swap"][0]
    assert new != old and new == read_object(s3, bucket, key)
    assert not any(".keyturn-tmp-" in k for k in by_point["rewrite:after-swap"][1])
    assert_every_row_once(lake, kms, registry, source)


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    import pyarrow.fs as pafs
    from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry
    from keyturn.aws.kms import AwsKms
    from keyturn.lake import Lake
    from keyturn.lake.rewrite import rewrite_file
    from keyturn.policy import KeyPolicy

    url, bucket, table = sys.argv[1:4]
    fs = pafs.S3FileSystem(endpoint_override=url.split("//", 1)[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    lake = Lake(bucket + "/lake", filesystem=fs)
    registry = DynamoDbKeyRegistry(table, endpoint_url=url, region="us-east-1")
    policy = KeyPolicy.from_registry(registry)
    contract = registry.get_contract("customers")
    with AwsKms(endpoint_url=url, region="us-east-1") as kms:
        for f in lake.data_files():
            rewrite_file(lake, f, kms=kms, policy=policy, dataset="customers", directory=registry,
                         contract=contract, mode="reencrypt")
    print("finished without crashing")
    """
)


@pytest.mark.parametrize("point", ["rewrite:mid-write", "rewrite:before-swap", "rewrite:after-swap"])
def test_crash_during_a_rewrite_loses_nothing_and_a_rerun_finishes(world, point):
    lake, kms, registry, s3, bucket = world["lake"], world["kms"], world["registry"], world["s3"], world["bucket"]
    source = source_table(90, 3)
    build_lake(lake, kms, registry, source, files_per_partition=1)
    registry.rotate(world["keys"][1]["KeyId"], **WHO)
    before = {f.relpath: read_object(s3, bucket, f"lake/{f.relpath}") for f in lake.data_files()}

    env = {**os.environ, "KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": "1"}  # crash in the second file
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, world["url"], bucket, world["table"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL at the crashpoint

    after = {f.relpath: read_object(s3, bucket, f"lake/{f.relpath}") for f in lake.data_files()}
    assert set(after) == set(before)  # no data key vanished or appeared
    changed = sorted(k for k in before if after[k] != before[k])
    assert len(changed) == (2 if point == "rewrite:after-swap" else 1)  # the first file, and the second only once swapped
    assert_every_row_once(lake, kms, registry, source)  # every row readable exactly once, old or new version

    leftovers = lake.remove_temp_files()  # what a rerun does first, under the lock
    if point == "rewrite:before-swap":
        assert len(leftovers) == 1  # the complete temp object of the file that was about to swap
    assert lake.temp_files() == []
    outcomes = [reencrypt(lake, f, kms, registry) for f in lake.data_files()]
    assert sum(o.result == "rewritten" for o in outcomes) == 3 - len(changed)
    assert {v for f in lake.data_files() for v in read_file_summary(lake, f).versions} == {2}
    assert assert_every_row_once(lake, kms, registry, source)["current"] == 90


# --------------------------------------------------------------------------- injected filesystems, the lock


def test_lake_lock_works_on_an_injected_s3_filesystem(world):
    lake = world["lake"]
    with lake.lock(exclusive=True, owner="job a"):
        with pytest.raises(LakeLockedError, match="job a"):
            lake.lock(exclusive=False).acquire()
        assert any(k == "lake/_keyturn/lock" for k in objects(world["s3"], world["bucket"]))
    assert not any(k == "lake/_keyturn/lock" for k in objects(world["s3"], world["bucket"]))


def test_pickled_lake_keeps_its_s3_filesystem(world):
    lake = world["lake"]
    write_parquet_atomically(lake, lake.new_data_path("region=1"), pa.table({"id": [1]}), None)
    clone = pickle.loads(pickle.dumps(lake))
    assert clone.root == lake.root and not clone.is_local
    assert len(clone.data_files()) == 1


def test_s3_uri_with_an_injected_filesystem(world):
    lake = Lake(f"s3://{world['bucket']}/lake", filesystem=world["fs"])
    assert lake.root == f"{world['bucket']}/lake"
    write_parquet_atomically(lake, lake.new_data_path("region=1"), pa.table({"id": [1]}), None)
    assert len(lake.data_files()) == 1
