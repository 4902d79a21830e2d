"""Beam transforms over Avro records (dicts) keyed by partition.

Input elements are `(partition: str, record: dict)`, or bare dicts (what
`beam.io.ReadFromAvro` yields), which belong to partition "" or, with
`partition_by=[fields]`, to the hive path of those fields' values
(``region=eu``; the fields stay in the record, since the Avro schema names
them). Records conform to the plain schema (EncryptRecords) or to the
encrypted schema derived by `keyturn.avro_codec.derive_encrypted_schema`
(the others; `EncryptRecords(...).encrypted_schema` is the one to give
`beam.io.WriteToAvro`). Any other element is refused with an `ElementTypeError` (an `InputError`)
naming these forms (`keyturn.transforms.partition.KeyRecords`). Outputs,
as `KeyturnOutputs`:

- `main`: `(partition, record)`, one element per record; with
  `output="records"`, the bare record (what `beam.io.WriteToAvro` takes);
- `version_mismatch`: `(event: dict, records: list[dict])`: a
  VersionMismatchEvent and the encrypted records it describes;
- `quarantine`: `dict` (schemas/quarantine_record.avsc); `payload` is an
  Avro container file of the original records;
- `audit`: `dict` (schemas/audit_event.avsc), one per scope.

The DEK scope is one partition within one bundle (and window), exactly as
for the Arrow transforms; the DoFns are the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Dict, List, Tuple

import apache_beam as beam

from keyturn.keysource import KeySource
from keyturn.policy import VersionRules
from keyturn.scope import ScopeLimits
from keyturn.transforms.adapters import AvroAdapter
from keyturn.transforms.arrow import keyturn_pardo
from keyturn.transforms.dofns import DecryptFn, EncryptFn, ReencryptFn
from keyturn.transforms.outputs import KeyturnOutputs
from keyturn.transforms.partition import KeyRecords, main_of
from keyturn.transforms.runners import check_runner
from keyturn.transforms.tags import AUDIT, MAIN, QUARANTINE, VERSION_MISMATCH

__all__ = ["EncryptRecords", "DecryptRecords", "ReencryptRecords", "OUTPUTS"]

Record = Dict[str, Any]
KeyedRecord = Tuple[str, Record]
KeyedRecords = Tuple[str, List[Record]]


def _as_list(kv: tuple[str, dict]) -> tuple[str, list[dict]]:
    return kv[0], [kv[1]]


def _explode(kv: tuple[str, list[dict]]):  # type: ignore[no-untyped-def]
    partition, records = kv
    for record in records:
        yield partition, record


OUTPUTS = ("keyed", "records")


def _record_of(kv: tuple[str, dict]) -> dict:
    return kv[1]


class _RecordsTransform(beam.PTransform):
    """Runs one keyturn DoFn over records, one record per element."""

    _fn: beam.DoFn
    partition_by: list[str] | None = None
    output: str = "keyed"

    def _configure(self, partition_by: Sequence[str] | str | None, output: str) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        self._key = KeyRecords(partition_by, what=type(self).__name__)
        self.partition_by = self._key.partition_by
        self.output = output

    def expand(self, pcoll: beam.PCollection) -> KeyturnOutputs:
        pcoll = main_of(pcoll)  # a KeyturnOutputs piped in: its main
        check_runner(pcoll.pipeline, type(self).__name__)
        key = getattr(self, "_key", None) or KeyRecords(what=type(self).__name__)
        tagged = (
            pcoll
            | "Key" >> key
            | "AsList" >> beam.Map(_as_list).with_output_types(KeyedRecords)
            | "Keyturn" >> keyturn_pardo(self._fn, KeyedRecords, Tuple[Record, List[Record]])
        )
        main = tagged[MAIN] | "Explode" >> beam.FlatMap(_explode).with_output_types(KeyedRecord)
        if self.output == "records":
            main = main | "Records" >> beam.Map(_record_of).with_output_types(Record)
        return KeyturnOutputs(main, tagged[VERSION_MISMATCH], tagged[QUARANTINE], tagged[AUDIT])


class EncryptRecords(_RecordsTransform):
    """Encrypt `fields` of each record (plain schema `schema`), one DEK per partition scope."""

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        schema: dict,
        fields: Sequence[str],
        *,
        bind_fields: Sequence[str] = (),
        limits: ScopeLimits = ScopeLimits(),
        actor: str = "keyturn",
        reason: str = "encrypt",
        partition_by: Sequence[str] | str | None = None,
        output: str = "keyed",
    ) -> None:
        super().__init__()
        adapter = AvroAdapter(plain_schema=schema, fields=fields, bind_fields=bind_fields)
        self.encrypted_schema = adapter.encrypted_schema
        self._fn = EncryptFn(adapter, keys, dataset, limits=limits, actor=actor, reason=reason)
        self._configure(partition_by, output)
        if self.partition_by and set(self.partition_by) & set(fields):
            raise ValueError(f"a partition field cannot be encrypted: {sorted(set(self.partition_by) & set(fields))}")


class DecryptRecords(_RecordsTransform):
    """Decrypt records of `encrypted_schema`; stale handling, `version_rules` and `rewrap_stale` as in `DecryptBatches`."""

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        encrypted_schema: dict,
        *,
        fields: Sequence[str] | None = None,
        stale_to_main: bool = True,
        actor: str = "keyturn",
        reason: str = "decrypt",
        version_rules: VersionRules | None = None,
        rewrap_stale: bool = False,
        partition_by: Sequence[str] | str | None = None,
        output: str = "keyed",
    ) -> None:
        super().__init__()
        adapter = AvroAdapter(encrypted_schema=encrypted_schema, decrypt_fields=fields)
        self._fn = DecryptFn(
            adapter, keys, dataset, stale_to_main=stale_to_main, actor=actor, reason=reason,
            version_rules=version_rules, rewrap_stale=rewrap_stale,
        )
        self._configure(partition_by, output)


class ReencryptRecords(_RecordsTransform):
    """Move stale records to the active key version: `rewrap`, `reencrypt` or `auto`."""

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        encrypted_schema: dict,
        *,
        mode: str = "rewrap",
        dek_max_age: timedelta = timedelta(days=365),
        limits: ScopeLimits = ScopeLimits(),
        actor: str = "keyturn",
        reason: str = "rotation",
        partition_by: Sequence[str] | str | None = None,
        output: str = "keyed",
    ) -> None:
        super().__init__()
        adapter = AvroAdapter(encrypted_schema=encrypted_schema)
        self._fn = ReencryptFn(
            adapter, keys, dataset, mode=mode, dek_max_age=dek_max_age, limits=limits, actor=actor, reason=reason
        )
        self._configure(partition_by, output)
