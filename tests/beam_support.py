"""Helpers for the Beam suite: real key homes on disk, sample batches, row views.

A key home is what a worker needs to encrypt: a root key file (mode 0600), a
`LocalKms` keystore sealed under it, and a SQLite key registry. Everything
lives in a test's `tmp_path`; DoFns get a picklable `LocalKeySource` that
points at those files and open the KMS and the registry in `setup()`.

Row views (`rows_of`, `keyed_rows`) turn record batches into sorted lists of
plain Python tuples, so pipelines can compare them with `equal_to` inside
`assert_that` without depending on how rows were split into batches.

Runner: batch pipelines run on `BATCH_RUNNER`, the FnApiRunner, which is the
DirectRunner's in-process batch engine. The DirectRunner itself (Beam 2.77)
first tries to download and start Prism from GitHub, and only falls back to
the FnApiRunner when that fails; pinning it keeps the suite off the network
and keeps DirectOptions (`direct_runner_bundle_repeat`,
`direct_running_mode`) meaningful. Streaming pipelines with `TestStream` use
the DirectRunner, which runs them on its BundleBasedDirectRunner.
"""

from __future__ import annotations

import base64
import copyreg
import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.metrics.metric import MetricsFilter

from keyturn import arrow_codec
from keyturn.ipc import batch_from_ipc, batch_to_ipc
from keyturn.keysource import LocalKeySource
from keyturn.kms.base import GeneratedDataKey, KmsBackend, RewrappedDataKey, UnwrappedDataKey
from keyturn.kms.local import LocalKms, generate_root_key_file
from keyturn.policy import KeyPolicy
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.scope import DekScope, KekRef, Location

__all__ = [
    "BATCH_RUNNER",
    "batch_pipeline",
    "DATASET",
    "SENSITIVE",
    "SCHEMA",
    "build_key_home",
    "key_source",
    "no_batch_pickling",
    "open_kms",
    "open_registry",
    "rotate",
    "retire",
    "sample_batch",
    "keyed_batches",
    "rows_of",
    "keyed_rows",
    "flatten_rows",
    "encrypt_direct",
    "with_version",
    "counters",
    "matches",
    "run_pipeline",
    "keyed_to_json",
    "keyed_from_json",
    "write_jsonl",
    "read_jsonl",
    "encrypt_with_beam",
    "tamper_cells",
    "LedgerKeySource",
    "read_ledger",
    "first_id",
]

BATCH_RUNNER = "FnApiRunner"
DATASET = "sales"
SENSITIVE = ("email", "card")
SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("region", pa.string()),
        pa.field("email", pa.string()),
        pa.field("card", pa.binary()),
        pa.field("amount", pa.float64()),
    ]
)


# --------------------------------------------------------------------------- key homes


def build_key_home(directory: str | os.PathLike[str], *, keks: Sequence[str] = ("kek-1", "kek-2")) -> LocalKeySource:
    """Create a key home in `directory`; return the `LocalKeySource` for it.

    Writes ``root.key`` (32 random bytes, 0600), ``keystore.json`` (a
    LocalKms keystore holding `keks`) and ``registry.sqlite`` (version 1 on
    the first KEK, active). Later KEKs are there for `rotate`.
    """
    home = Path(directory)
    home.mkdir(parents=True, exist_ok=True)
    key_file = generate_root_key_file(home / "root.key")
    with LocalKms.create(home / "keystore.json", key_file=key_file) as kms:
        for kek_id in keks:
            kms.create_kek(kek_id)
    registry = SqliteKeyRegistry(str(home / "registry.sqlite"))
    registry.initialize(keks[0], actor="tests", reason="key home for the Beam suite")
    return LocalKeySource(
        keystore=str(home / "keystore.json"), registry=str(home / "registry.sqlite"), key_file=str(key_file)
    )


def _refuse_to_pickle(batch: pa.RecordBatch) -> Any:
    raise AssertionError("a pyarrow.RecordBatch was pickled; batches must travel as Arrow IPC (RecordBatchCoder)")


@pytest.fixture
def no_batch_pickling(monkeypatch) -> None:
    """While active, pickling a `pyarrow.RecordBatch` in this process raises.

    pickle, cloudpickle and dill all consult `copyreg.dispatch_table`, and so
    does Beam's FastPrimitivesCoder fallback, so an in-process pipeline that
    pickles a batch anywhere (coders, state, side outputs) fails.
    """
    monkeypatch.setitem(copyreg.dispatch_table, pa.RecordBatch, _refuse_to_pickle)


@pytest.fixture
def key_source(tmp_path) -> LocalKeySource:
    """A fresh key home in ``tmp_path/keys``: kek-1 (version 1, active) and kek-2 (unused)."""
    return build_key_home(tmp_path / "keys")


def open_kms(source: LocalKeySource) -> LocalKms:
    return source.open_kms()  # type: ignore[return-value]


def open_registry(source: LocalKeySource) -> SqliteKeyRegistry:
    return source.open_registry()  # type: ignore[return-value]


def rotate(source: LocalKeySource, kek_id: str = "kek-2") -> int:
    """Rotate the registry onto `kek_id` (created in the keystore if absent); return the new version."""
    kms = open_kms(source)
    try:
        if not kms.has_kek(kek_id):
            kms.create_kek(kek_id)
    finally:
        kms.close()
    return open_registry(source).rotate(kek_id, actor="tests", reason="rotation under test").version


def retire(source: LocalKeySource, version: int) -> None:
    """Retire `version`, refused by the registry while its DEK directory holds DEKs under it."""
    open_registry(source).retire(version, actor="tests", reason="retirement under test")


def force_retire(source: LocalKeySource, version: int) -> None:
    """Retire `version` behind the registry's back, DEKs still under it: someone with write access to the registry
    file (or a registry restored from an old backup). Readers must still refuse the version's data."""
    import sqlite3
    from datetime import datetime, timezone

    at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with sqlite3.connect(source.registry) as conn:
        conn.execute("UPDATE versions SET state = 'retired', state_changed_at = ? WHERE version = ?", (at, version))
        conn.execute(
            "INSERT INTO history (version, from_state, to_state, at, actor, reason) VALUES (?, 'decrypt_only', 'retired', ?, 'intruder', 'out of band')",
            (version, at),
        )


# --------------------------------------------------------------------------- sample data


def sample_batch(rows: int, *, start: int = 0, region: str = "eu") -> pa.RecordBatch:
    """`rows` rows with ids start..start+rows-1; some sensitive cells are null."""
    ids = list(range(start, start + rows))
    return pa.RecordBatch.from_pydict(
        {
            "id": ids,
            "region": [region if i % 7 else None for i in ids],
            "email": [None if i % 5 == 3 else f"user{i}@example.com" for i in ids],
            "card": [None if i % 11 == 4 else (f"4111-{i:08d}").encode() for i in ids],
            "amount": [None if i % 13 == 6 else i * 1.25 for i in ids],
        },
        schema=SCHEMA,
    )


def keyed_batches(
    partitions: Sequence[str], batches_per_partition: int, rows_per_batch: int, *, start: int = 0
) -> list[tuple[str, pa.RecordBatch]]:
    """`(partition, batch)` elements with globally unique ids, partitions interleaved."""
    out: list[tuple[str, pa.RecordBatch]] = []
    next_id = start
    for _ in range(batches_per_partition):
        for p in partitions:
            out.append((p, sample_batch(rows_per_batch, start=next_id, region=p)))
            next_id += rows_per_batch
    return out


# --------------------------------------------------------------------------- row views


def rows_of(batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
    """A batch's rows as tuples (in schema order), sorted."""
    names = batch.schema.names
    return sorted((tuple(r[n] for n in names) for r in batch.to_pylist()), key=repr)


def keyed_rows(elements: Iterable[tuple[str, pa.RecordBatch]]) -> list[tuple[Any, ...]]:
    """`(partition, *row)` for every row of every element (a multiset, as a list)."""
    return [(p, *row) for p, batch in elements for row in rows_of(batch)]


def flatten_rows(element: tuple[str, pa.RecordBatch]) -> list[tuple[Any, ...]]:
    """For `beam.FlatMap`: one `(partition, *row)` tuple per row of a keyed batch."""
    partition, batch = element
    return [(partition, *row) for row in rows_of(batch)]


# --------------------------------------------------------------------------- crafted batches


def encrypt_direct(
    source: LocalKeySource, batch: pa.RecordBatch, partition: str, *, version: int, kek_id: str = "kek-1"
) -> pa.RecordBatch:
    """Encrypt with the core codec under an arbitrary `version` label (e.g. one the registry never had).

    The envelope and the `_keyturn_version` column agree, and the wrapped DEK
    is bound to that version, so the batch is well formed, only unknown.
    """
    kms = open_kms(source)
    try:
        with DekScope(kms, KekRef(version, kek_id), Location(DATASET, partition)) as scope:
            return arrow_codec.encrypt_batch(batch, SENSITIVE, scope)
    finally:
        kms.close()


def with_version(batch: pa.RecordBatch, version: int | None, *, drop_envelope: bool = False) -> pa.RecordBatch:
    """`batch` with its `_keyturn_version` column set to `version` (None: null), optionally the envelope nulled."""
    idx = batch.schema.get_field_index(arrow_codec.VERSION_COLUMN)
    arrays = list(batch.columns)
    arrays[idx] = pa.array([version] * batch.num_rows, pa.int64())
    if drop_envelope:
        d = batch.schema.get_field_index(arrow_codec.DEK_COLUMN)
        arrays[d] = pa.nulls(batch.num_rows, batch.schema.field(d).type)
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def policy_of(source: LocalKeySource) -> KeyPolicy:
    return KeyPolicy.from_registry(open_registry(source))


# --------------------------------------------------------------------------- running


def matches(check: Any) -> Any:
    """A matcher for `assert_that`: runs `check(actual_list)`, reporting an AssertionError as a Beam failure."""
    from apache_beam.testing.util import BeamAssertException

    def _match(actual: Any) -> None:
        try:
            check(list(actual))
        except AssertionError as exc:
            raise BeamAssertException(str(exc) or repr(exc)) from None

    return _match


def counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """Committed counters in namespace "keyturn", by name (summed over steps)."""
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("keyturn"))["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + c.committed
    return out


def batch_pipeline(**options: Any) -> Any:
    """A `TestPipeline` on `BATCH_RUNNER` with `options` (DirectOptions and friends)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing import test_pipeline

    return test_pipeline.TestPipeline(runner=BATCH_RUNNER, options=PipelineOptions(flags=[], **options))


def run_pipeline(build, **options: Any) -> beam.runners.runner.PipelineResult:
    """Build with `build(pipeline)` on a fresh `BATCH_RUNNER` pipeline, run it to the end, return the result."""
    from apache_beam.options.pipeline_options import PipelineOptions

    p = beam.Pipeline(runner=BATCH_RUNNER, options=PipelineOptions(flags=[], **options))
    build(p)
    result = p.run()
    result.wait_until_finish()
    return result


# --------------------------------------------------------------------------- results through files


def keyed_to_json(element: tuple[str, pa.RecordBatch]) -> str:
    """One JSON line for a keyed batch: the partition and the batch as base64 Arrow IPC."""
    partition, batch = element
    return json.dumps([partition, base64.b64encode(batch_to_ipc(batch)).decode("ascii")])


def keyed_from_json(line: str) -> tuple[str, pa.RecordBatch]:
    partition, data = json.loads(line)
    return partition, batch_from_ipc(base64.b64decode(data))


def write_jsonl(pcoll: beam.PCollection, prefix: str | os.PathLike[str], label: str) -> None:
    """Write a PCollection of JSON strings as text shards ``<prefix>-*.jsonl``."""
    _ = pcoll | label >> beam.io.WriteToText(os.fspath(prefix), file_name_suffix=".jsonl")


def read_jsonl(prefix: str | os.PathLike[str]) -> list[str]:
    """Every line of every shard written by `write_jsonl` under `prefix`."""
    lines: list[str] = []
    for name in sorted(glob.glob(os.fspath(prefix) + "*.jsonl")):
        with open(name, encoding="utf-8") as fh:
            lines.extend(line.rstrip("\n") for line in fh if line.strip())
    return lines


def first_id(element: tuple[str, pa.RecordBatch]) -> tuple[str, int]:
    partition, batch = element
    return partition, batch.column("id")[0].as_py()


def encrypt_with_beam(
    source: Any, data: Sequence[tuple[str, pa.RecordBatch]], workdir: str | os.PathLike[str], **encrypt_kwargs: Any
) -> list[tuple[str, pa.RecordBatch]]:
    """Run EncryptBatches on the DirectRunner and read the encrypted batches back, sorted by (partition, first id)."""
    from keyturn.transforms.arrow import EncryptBatches

    prefix = os.path.join(os.fspath(workdir), "encrypted")

    def build(p: beam.Pipeline) -> None:
        out = (
            p | "Plain" >> beam.Create(data) | "Encrypt" >> EncryptBatches(source, DATASET, SENSITIVE, **encrypt_kwargs)
        )
        write_jsonl(out.main | "Json" >> beam.Map(keyed_to_json), prefix, "Write")

    run_pipeline(build)
    return sorted((keyed_from_json(line) for line in read_jsonl(prefix)), key=first_id)


def tamper_cells(batch: pa.RecordBatch, rows: Iterable[int], column: str = "email") -> pa.RecordBatch:
    """Flip the last byte (in the GCM tag) of `column`'s cell in each of `rows`; the rows must have that cell."""
    idx = batch.schema.get_field_index(column)
    cells = batch.column(idx).to_pylist()
    for i in rows:
        if cells[i] is None:
            raise ValueError(f"row {i} has no {column} cell to tamper with")
        cells[i] = cells[i][:-1] + bytes([cells[i][-1] ^ 0x01])
    arrays = list(batch.columns)
    arrays[idx] = pa.array(cells, batch.schema.field(idx).type)
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


# --------------------------------------------------------------------------- a KMS that keeps a call log


class _LedgerKms:
    """Delegates to a KMS backend and appends one line per call to a file: the KMS's own call log.

    Lines are ``<operation> <partition> <dek id hex>``; no key material.
    Side effects like this survive a discarded bundle attempt, exactly as
    calls to a real KMS would.
    """

    def __init__(self, inner: KmsBackend, path: str) -> None:
        self._inner = inner
        self._path = path

    def _log(self, op: str, context: Mapping[str, str]) -> None:
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(f"{op} {context.get('keyturn:partition', '')} {context.get('keyturn:dek', '')}\n")

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        result = self._inner.generate_data_key(kek_id, context)
        self._log("generate", context)
        return result

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        result = self._inner.decrypt(kek_id, wrapped, context)
        self._log("decrypt", context)
        return result

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> RewrappedDataKey:
        result = self._inner.rewrap(wrapped, **kwargs)
        self._log("rewrap", kwargs["destination_context"])
        return result


@dataclass(frozen=True)
class LedgerKeySource:
    """A picklable key source whose KMS logs every call to `ledger` (see `_LedgerKms`)."""

    inner: LocalKeySource
    ledger: str

    def open_kms(self) -> KmsBackend:
        return _LedgerKms(self.inner.open_kms(), self.ledger)

    def open_registry(self) -> Any:
        return self.inner.open_registry()


def read_ledger(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """The calls a `LedgerKeySource` recorded, as (operation, partition, dek id hex)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [tuple(line.split(" ")) for line in fh.read().splitlines()]  # type: ignore[misc]
