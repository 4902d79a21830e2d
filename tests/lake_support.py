"""Helpers for the lake and reencrypt tests: a key home, a small encrypted lake, plaintext views.

`build_lake` writes an encrypted hive-partitioned lake straight through the
core (`encrypt_batch` + `write_parquet_atomically`), so these tests do not
depend on the encrypt pipeline. `lake_plaintext` decrypts every data file
with the core reader and returns the rows sorted by id, plus the read
statuses, so a test can say "every row exactly once" by comparing with the
source. `CountingKeySource` logs every KMS call to a file, which survives
pickling into DoFns and subprocesses.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.keysource import LocalKeySource
from keyturn.contract import settle_arrow_contract
from keyturn.lake import Lake, footer_for, write_parquet_atomically
from keyturn.lake.footer import dek_counts
from keyturn.policy import KeyPolicy
from keyturn.reader import DekReader
from keyturn.scope import DekScope, KekRef, Location
from keyturn.home import KeyHome

DATASET = "customers"
SENSITIVE = ["email", "ssn"]


def make_home(path: str) -> KeyHome:
    return KeyHome.init(path, dataset=DATASET)


def rotate(home: KeyHome) -> int:
    """Add the next key version as active (old one decrypt-only); returns it."""
    registry = home.registry()
    version = registry.active().version + 1
    kek_id = home.provision_kek(version)
    return registry.rotate(kek_id, actor="tests", reason="rotate").version


def source_table(rows: int, partitions: int, seed: int = 3) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(rows, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "region": (ids % partitions).astype(np.int64),
            "email": [f"user{i}@example.com" for i in ids],
            "ssn": [None if i % 17 == 0 else f"{i:03d}-{i % 97:02d}-{i % 9973:04d}" for i in ids],
            "spend": rng.normal(100, 30, rows).round(2),
        }
    )


def build_lake(
    home: KeyHome, lake_dir: str, table: pa.Table, *, files_per_partition: int = 2, row_group_size: int = 50
) -> Lake:
    """Encrypt `table` into `lake_dir` (partitioned by region) under the active key version."""
    lake = Lake(lake_dir)
    policy = home.policy()
    registry = home.registry()
    contract = pin_contract(home, table.drop_columns(["region"]).schema)
    with home.kms() as kms:
        for region in sorted(set(table.column("region").to_pylist())):
            part = table.filter(pc.equal(table["region"], region)).drop_columns(["region"])
            partition = f"region={region}"
            step = -(-part.num_rows // files_per_partition)
            for start in range(0, part.num_rows, step):
                chunk = part.slice(start, step).combine_chunks().to_batches()[0]
                with DekScope(
                    kms, policy.active, Location(DATASET, partition), directory=registry,
                    contract_revision=contract.revision,
                ) as scope:
                    sealed = encrypt_batch(chunk, SENSITIVE, scope)
                footer = footer_for(
                    DATASET, partition, {policy.active.version: sealed.num_rows}, sealed.num_rows, SENSITIVE,
                    dek_counts(sealed),
                )
                write_parquet_atomically(lake, lake.new_data_path(partition), sealed, footer, row_group_size=row_group_size)
    return lake


def write_encrypted_file(
    home: KeyHome, lake: Lake, partition: str, table: pa.Table, kek: KekRef, *, footer: bool = True
) -> str:
    """One file encrypted under `kek`; its DEK is registered unless the registry does not know `kek`'s version."""
    registry = home.registry()
    known = kek.version in {v.version for v in registry.versions() if v.state.readable}
    contract = pin_contract(home, table.schema)
    with home.kms() as kms:
        with DekScope(
            kms, kek, Location(DATASET, partition), directory=registry if known else None,
            contract_revision=contract.revision,
        ) as scope:
            sealed = encrypt_batch(table.combine_chunks().to_batches()[0], SENSITIVE, scope)
    path = lake.new_data_path(partition)
    meta = footer_for(DATASET, partition, {kek.version: sealed.num_rows}, sealed.num_rows, SENSITIVE) if footer else None
    write_parquet_atomically(lake, path, sealed, meta)
    return path


def lake_plaintext(home: KeyHome, lake_dir: str) -> tuple[pa.Table, Counter]:
    """Every readable row of the lake decrypted (region restored from the path), sorted by id; and status counts."""
    lake = Lake(lake_dir)
    policy = home.policy()
    registry = home.registry()
    contract = registry.get_contract(DATASET)
    tables = []
    statuses: Counter = Counter()
    with home.kms() as kms, DekReader(kms, directory=registry) as reader:
        for f in lake.data_files():
            table = pq.read_table(f.path)
            for batch in table.to_batches():
                result = decrypt_batch(batch, reader, policy, Location(DATASET, f.partition), contract=contract)
                statuses.update(result.counts())
                plain = pa.Table.from_batches([result.plain])
                region = int(f.partition.split("=")[1])
                plain = plain.append_column("region", pa.array([region] * plain.num_rows, pa.int64()))
                tables.append(plain.select(["id", "region", "email", "ssn", "spend"]))
    if not tables:
        return pa.table({"id": pa.array([], pa.int64())}), statuses
    out = pa.concat_tables(tables).replace_schema_metadata(None)
    return out.sort_by("id"), statuses


def pin_contract(home: KeyHome, plain_schema: pa.Schema) -> Any:
    """The dataset's contract (SENSITIVE encrypted), pinned from `plain_schema` on first use."""
    return settle_arrow_contract(home.registry(), DATASET, plain_schema, SENSITIVE, actor="tests")


def plain_equal(home: KeyHome, lake_dir: str, source: pa.Table) -> bool:
    got, statuses = lake_plaintext(home, lake_dir)
    want = source.sort_by("id").replace_schema_metadata(None)
    return got.num_rows == want.num_rows and got.cast(want.schema).equals(want)


def snapshot(lake_dir: str) -> dict[str, tuple[bytes, int]]:
    """Every file under the lake (hidden ones too): relative path -> (bytes, mtime_ns)."""
    out = {}
    for root, _dirs, files in os.walk(lake_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, lake_dir)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def data_snapshot(lake_dir: str) -> dict[str, bytes]:
    """Data files only (no hidden names): relative path -> bytes."""
    return {f.relpath: open(f.path, "rb").read() for f in Lake(lake_dir).data_files()}


def temp_files(lake_dir: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(root, n), lake_dir)
        for root, _d, files in os.walk(lake_dir)
        for n in files
        if n.startswith(".keyturn-tmp-")
    ]


def hive_view(lake_dir: str) -> pa.Table:
    """What pyarrow.dataset with hive partitioning sees: non-sensitive columns, sorted by id."""
    table = ds.dataset(lake_dir, format="parquet", partitioning="hive").to_table(columns=["id", "region", "spend"])
    return table.sort_by("id")


def file_versions(lake_dir: str) -> dict[str, dict[int, int]]:
    """Per data file, rows per `_keyturn_version` as actually stored (reads the column)."""
    out = {}
    for f in Lake(lake_dir).data_files():
        col = pq.read_table(f.path, columns=["_keyturn_version"]).column(0).to_pylist()
        out[f.relpath] = dict(Counter(col))
    return out


# -- counting KMS calls across pickling and processes ---------------------------------


class _LoggingKms:
    def __init__(self, inner: Any, log: str) -> None:
        self._inner = inner
        self._log = log

    def _note(self, op: str) -> None:
        with open(self._log, "a") as f:
            f.write(op + "\n")

    def generate_data_key(self, kek_id, context):  # type: ignore[no-untyped-def]
        self._note("generate")
        return self._inner.generate_data_key(kek_id, context)

    def decrypt(self, kek_id, wrapped, context):  # type: ignore[no-untyped-def]
        self._note("decrypt")
        return self._inner.decrypt(kek_id, wrapped, context)

    def rewrap(self, wrapped, **kwargs):  # type: ignore[no-untyped-def]
        self._note("rewrap")
        return self._inner.rewrap(wrapped, **kwargs)

    def close(self) -> None:
        self._inner.close()


@dataclass(frozen=True)
class CountingKeySource:
    """A key source whose KMS appends one line per call to `log`."""

    inner: LocalKeySource
    log: str

    def open_kms(self) -> Any:
        return _LoggingKms(self.inner.open_kms(), self.log)

    def open_registry(self) -> Any:
        return self.inner.open_registry()

    def calls(self) -> list[str]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return f.read().split()


def partition_of(relpath: str) -> str:
    return posixpath.dirname(relpath)


def policy_of(home: KeyHome) -> KeyPolicy:
    return home.policy()
