"""Payload adapters: what differs between Arrow batches and Avro records.

The DoFns in `keyturn.transforms.dofns` are written once against this small
interface; `ArrowAdapter` and `AvroAdapter` bind it to the core codecs.
A payload is one element's data: a `pyarrow.RecordBatch`, or a list of Avro
records (dicts).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from keyturn import arrow_codec
from keyturn.contract import DatasetContract, arrow_contract, avro_contract
from keyturn.ipc import batch_ipc_buffer, batch_to_ipc
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reader import DekReader
from keyturn.scope import DekScope, Location

__all__ = ["PayloadAdapter", "ArrowAdapter", "AvroAdapter", "Rewritten"]


@dataclass
class Rewritten:
    """A payload after rewrap or re-encryption: every input row, in order."""

    payload: Any
    status: list[ReadStatus]
    kms_request_ids: list[str]
    deks_rewrapped: int = 0


class PayloadAdapter(Protocol):
    """The codec operations a DoFn needs, for one payload kind."""

    payload_format: str

    def rows(self, payload: Any) -> int: ...

    def propose_contract(self, dataset: str, payload: Any) -> DatasetContract:
        """The contract a first write of `payload` pins for `dataset`."""
        ...

    def encrypt(self, payload: Any, scope: DekScope, contract: DatasetContract | None) -> Any: ...

    def decrypt(
        self, payload: Any, reader: DekReader, policy: KeyPolicy, location: Location, contract: DatasetContract | None
    ) -> Any: ...

    def row_keys(self, payload: Any) -> tuple[list[int | None], list[bytes | None]]:
        """Each row's `_keyturn_version` and DEK envelope (None where absent)."""
        ...

    def reencrypt(
        self,
        payload: Any,
        reader: DekReader,
        scope: DekScope,
        policy: KeyPolicy,
        location: Location,
        contract: DatasetContract | None,
    ) -> Rewritten: ...

    def take(self, payload: Any, rows: list[int]) -> Any: ...

    def row_versions(self, payload: Any) -> list[int | None]: ...

    def sealed_cells(self, payload: Any, rows: list[int]) -> int:
        """Non-null encrypted cells among `rows` of an encrypted payload."""
        ...

    def select_plain(self, result: Any, statuses: set[ReadStatus]) -> Any: ...

    def serialize(self, payload: Any) -> bytes: ...

    def fingerprint(self, payload: Any, *, encrypted: bool) -> bytes: ...

    def empty(self, payload: Any) -> bool: ...


def _digest(*parts: bytes | pa.Buffer) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


class ArrowAdapter:
    """Arrow record batches through `keyturn.arrow_codec`."""

    payload_format = "arrow_ipc"

    def __init__(self, columns: Sequence[str] = (), bind_columns: Sequence[str] = (), decrypt_columns: Sequence[str] | None = None) -> None:
        self.columns = tuple(columns)
        self.bind_columns = tuple(bind_columns)
        self.decrypt_columns = None if decrypt_columns is None else tuple(decrypt_columns)

    def rows(self, payload: pa.RecordBatch) -> int:
        return payload.num_rows

    def empty(self, payload: pa.RecordBatch) -> bool:
        return payload.num_rows == 0

    def propose_contract(self, dataset: str, payload: pa.RecordBatch) -> DatasetContract:
        return arrow_contract(dataset, payload.schema, self.columns, bind=self.bind_columns)

    def encrypt(self, payload: pa.RecordBatch, scope: DekScope, contract: DatasetContract | None) -> pa.RecordBatch:
        return arrow_codec.encrypt_batch(payload, self.columns, scope, bind_columns=self.bind_columns, contract=contract)

    def decrypt(
        self,
        payload: pa.RecordBatch,
        reader: DekReader,
        policy: KeyPolicy,
        location: Location,
        contract: DatasetContract | None,
    ) -> arrow_codec.DecryptResult:
        return arrow_codec.decrypt_batch(payload, reader, policy, location, columns=self.decrypt_columns, contract=contract)

    def row_keys(self, payload: pa.RecordBatch) -> tuple[list[int | None], list[bytes | None]]:
        return arrow_codec.row_keys(payload)

    def reencrypt(
        self,
        payload: pa.RecordBatch,
        reader: DekReader,
        scope: DekScope,
        policy: KeyPolicy,
        location: Location,
        contract: DatasetContract | None,
    ) -> Rewritten:
        result = arrow_codec.reencrypt_batch(payload, reader, scope, policy, location, contract=contract)
        return Rewritten(result.batch, result.status, [])

    def take(self, payload: pa.RecordBatch, rows: list[int]) -> pa.RecordBatch:
        return payload.take(pa.array(rows, pa.int64()))

    def row_versions(self, payload: pa.RecordBatch) -> list[int | None]:
        if arrow_codec.VERSION_COLUMN not in payload.schema.names:
            return [None] * payload.num_rows
        return payload.column(arrow_codec.VERSION_COLUMN).to_pylist()

    def sealed_cells(self, payload: pa.RecordBatch, rows: list[int]) -> int:
        if len(rows) != payload.num_rows:
            payload = self.take(payload, rows)
        return sum(len(payload.column(c)) - payload.column(c).null_count for c in arrow_codec.encrypted_columns(payload.schema))

    def select_plain(self, result: arrow_codec.DecryptResult, statuses: set[ReadStatus]) -> pa.RecordBatch:
        keep = [i for i, s in enumerate(result.plain_status) if s in statuses]
        if len(keep) == result.plain.num_rows:
            return result.plain
        return result.plain.take(pa.array(keep, pa.int64()))

    def serialize(self, payload: pa.RecordBatch) -> bytes:
        return batch_to_ipc(payload)

    def fingerprint(self, payload: pa.RecordBatch, *, encrypted: bool) -> bytes:
        """A digest of what is stored in clear, so audit ids never hash plaintext secrets."""
        if encrypted:
            return _digest(batch_ipc_buffer(payload))
        public = payload.drop_columns([c for c in self.columns if c in payload.schema.names])
        nulls = b"".join(payload.column(c).null_count.to_bytes(8, "big") for c in self.columns if c in payload.schema.names)
        return _digest(batch_ipc_buffer(public), payload.num_rows.to_bytes(8, "big"), nulls)


class AvroAdapter:
    """Avro records (dicts) through `keyturn.avro_codec`, with their schemas."""

    payload_format = "avro"

    def __init__(
        self,
        plain_schema: dict | None = None,
        encrypted_schema: dict | None = None,
        fields: Sequence[str] = (),
        bind_fields: Sequence[str] = (),
        decrypt_fields: Sequence[str] | None = None,
    ) -> None:
        from keyturn import avro_codec

        self.fields = tuple(fields)
        self.bind_fields = tuple(bind_fields)
        self.decrypt_fields = None if decrypt_fields is None else tuple(decrypt_fields)
        self.plain_schema = plain_schema
        if encrypted_schema is None and plain_schema is not None and fields:
            encrypted_schema = avro_codec.derive_encrypted_schema(plain_schema, fields, bind_fields=bind_fields)
        self.encrypted_schema = encrypted_schema

    def rows(self, payload: list[dict]) -> int:
        return len(payload)

    def empty(self, payload: list[dict]) -> bool:
        return not payload

    def propose_contract(self, dataset: str, payload: list[dict]) -> DatasetContract:
        if self.plain_schema is None:
            raise ValueError("encrypting Avro records needs the plain schema")
        types = {f["name"]: f["type"] for f in self.plain_schema["fields"]}
        return avro_contract(dataset, types, self.fields, bind=self.bind_fields)

    def encrypt(self, payload: list[dict], scope: DekScope, contract: DatasetContract | None) -> list[dict]:
        from keyturn import avro_codec

        return avro_codec.encrypt_records(
            payload, self.plain_schema, self.fields, scope, bind_fields=self.bind_fields, contract=contract
        )

    def decrypt(
        self, payload: list[dict], reader: DekReader, policy: KeyPolicy, location: Location, contract: DatasetContract | None
    ) -> Any:
        from keyturn import avro_codec

        return avro_codec.decrypt_records(
            payload, self.encrypted_schema, reader, policy, location, fields=self.decrypt_fields, contract=contract
        )

    def row_keys(self, payload: list[dict]) -> tuple[list[int | None], list[bytes | None]]:
        versions, envelopes = [], []
        for r in payload:
            v, env = r.get("_keyturn_version"), r.get("_keyturn_dek")
            versions.append(v if isinstance(v, int) and not isinstance(v, bool) else None)
            envelopes.append(bytes(env) if isinstance(env, (bytes, bytearray, memoryview)) else None)
        return versions, envelopes

    def reencrypt(
        self,
        payload: list[dict],
        reader: DekReader,
        scope: DekScope,
        policy: KeyPolicy,
        location: Location,
        contract: DatasetContract | None,
    ) -> Rewritten:
        from keyturn import avro_codec

        result = avro_codec.reencrypt_records(
            payload, self.encrypted_schema, reader, scope, policy, location, contract=contract
        )
        return Rewritten(result.records, result.status, [])

    def take(self, payload: list[dict], rows: list[int]) -> list[dict]:
        return [payload[i] for i in rows]

    def row_versions(self, payload: list[dict]) -> list[int | None]:
        return [r.get("_keyturn_version") for r in payload]

    def sealed_cells(self, payload: list[dict], rows: list[int]) -> int:
        names = [f["name"] for f in self.encrypted_schema["fields"] if f.get("keyturn.format") == "1"]
        return sum(1 for i in rows for n in names if payload[i].get(n) is not None)

    def select_plain(self, result: Any, statuses: set[ReadStatus]) -> list[dict]:
        return [r for r, s in zip(result.plain, result.plain_status) if s in statuses]

    def serialize(self, payload: list[dict]) -> bytes:
        import fastavro

        out = io.BytesIO()
        fastavro.writer(out, fastavro.parse_schema(self.encrypted_schema), payload)
        return out.getvalue()

    def fingerprint(self, payload: list[dict], *, encrypted: bool) -> bytes:
        import fastavro

        if encrypted:
            schema, records = self.encrypted_schema, payload
        else:
            public = [f for f in self.plain_schema["fields"] if f["name"] not in self.fields]
            schema = {**self.plain_schema, "fields": public}
            records = [{f["name"]: r.get(f["name"]) for f in public} for r in payload]
        parsed = fastavro.parse_schema(schema)
        out = io.BytesIO()
        for record in records:
            fastavro.schemaless_writer(out, parsed, record)
        nulls = b"".join(sum(1 for r in payload if r.get(f) is None).to_bytes(8, "big") for f in self.fields)
        return _digest(out.getvalue(), len(payload).to_bytes(8, "big"), b"" if encrypted else nulls)
