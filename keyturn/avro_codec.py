"""Avro codec: encrypt, decrypt, rewrap and re-encrypt Avro records (Python dicts).

The Avro twin of `keyturn.arrow_codec`: same scopes, readers, statuses and
guarantees, built on the same core (`DekScope.seal_rows`, `open_rows`,
`classify_rows`, `rewrap_envelope`).

Encrypted schema (`derive_encrypted_schema`):

- The record keeps its name and namespace, so consumers keep their type: the
  encrypted schema is a new version of the same record (same registry
  subject, same generated class name), not a new type.
- Each sensitive top-level field becomes ``["null", "bytes"]`` with default
  null and carries ``keyturn.format`` ("1"), ``keyturn.plain_type`` (the
  original field type, JSON, verbatim) and ``keyturn.bind`` (the bound field
  names). Its original default is dropped: the encrypted field must default
  to null, and a plaintext default does not belong next to ciphertext.
  `plain_schema_of` gives back the plain schema without those defaults.
  Other field attributes (doc, aliases, order, custom ones) are kept.
- ``_keyturn_version`` and ``_keyturn_dek`` are appended at the end, copied
  from ``schemas/encrypted_envelope.avsc`` (their single source of truth).
- Top-level fields only: a nested path (``a.b.c``) is encrypted by
  encrypting its top-level field ``a``, whose whole value is one cell.
- Named types: a type defined inside a sensitive field lives on only in
  ``keyturn.plain_type``, so a field that stays in clear may not use it; nor
  may a clear field refer to the record itself (the name now means the
  encrypted record). Both raise `ValueError`. Sensitive fields may use any
  named type of the plain schema: values are serialized with the plain
  schema's named types in scope.

Cell plaintext: the Avro binary encoding of the value under the field's
plain type (``fastavro.schemaless_writer``), so every value round-trips
exactly as it would through a plain Avro file. Values are validated against
the plain type before sealing. A field missing from a record takes its plain
default, as fastavro's writer does. A None value stays null and is not
encrypted, so null-ness is visible (and nulling a cell of a nullable field
is not detected); a null cell in a field whose type cannot be null is
corrupt.

Binding: each cell is bound to its dataset, partition, field, plain type
(`avro_type_descriptor` of ``keyturn.plain_type``) and DEK. Values
of `bind_fields` (Avro-encoded under their type; None values are left out)
also pin a cell to its record. Without them, cells can be swapped between
records sealed under the same DEK without detection.

Reads never raise for bad records: every input record gets a `ReadStatus`,
only current and stale ones are decrypted, and `rows_with` returns the
original records of the others, so nothing is lost. A plaintext that does not
decode exactly (error or trailing bytes) makes its record corrupt, and so
does a ``keyturn.plain_type`` edited to any other type (even one with an
identical encoding, string vs bytes): the type is authenticated with each
cell.

Dataset contracts: `decrypt_records`, `reencrypt_records` and
`encrypt_records` take the dataset's `DatasetContract` (codec ``avro``, from
the key registry). With one, the sensitive fields, their plain types and
descriptors and the bound fields come from the contract, never from the
schema's ``keyturn.*`` properties: the schema is read as
`contract_encrypted_schema` (every contract field ``["null", "bytes"]`` with
the contract's properties). A record whose value in a contract field is
anything but bytes or None (a forged plaintext), or that lacks a contract
field its DEK's contract revision requires, is corrupt; a field with
``keyturn.*`` properties that the contract does not name is never passed
through as clear data (a record with a non-null value there is corrupt). A
record whose DEK was born before a field joined the contract reads that
field as null unless it holds ciphertext (a clear value there is never
returned: nothing proves it genuine). With a DEK directory on the
reader, records are classified against the directory (`classify_keys`): a
DEK it does not know is unknown, and the effective key version is the
directory's.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
from fastavro.validation import validate as _avro_validate

from keyturn.avro_values import avro_type_descriptor
from keyturn.contract import DatasetContract, check_avro_write
from keyturn.errors import ContractError, DecryptionError
from keyturn.format import DEK_FIELD, VERSION_FIELD
from keyturn.kms.base import KmsBackend
from keyturn.policy import KeyPolicy, ReadStatus, StatusCounts, classify_keys
from keyturn.reader import DekReader, open_rows
from keyturn.rewrap import rewrap_rows
from keyturn.scope import DekScope, Location
from keyturn.schemas import load_schema


__all__ = [
    "VERSION_FIELD",
    "DEK_FIELD",
    "FORMAT_PROP",
    "PLAIN_TYPE_PROP",
    "BIND_PROP",
    "derive_encrypted_schema",
    "contract_encrypted_schema",
    "plain_schema_of",
    "encrypted_fields",
    "encrypt_records",
    "decrypt_records",
    "rewrap_records",
    "reencrypt_records",
    "AvroDecryptResult",
    "AvroRewrapResult",
    "AvroReencryptResult",
    "avro_type_descriptor",
]

FORMAT_PROP = "keyturn.format"
PLAIN_TYPE_PROP = "keyturn.plain_type"
BIND_PROP = "keyturn.bind"
ENVELOPE_SCHEMA = "encrypted_envelope"
_FORMAT = "1"
_RESERVED_PREFIX = "_keyturn_"
_PROP_PREFIX = "keyturn."
_FASTAVRO_KEYS = ("__fastavro_parsed", "__named_schemas")
_CELL_RECORD = "_keyturn_cell"  # no namespace, so fully qualified names inside resolve unchanged
_CELL_FIELD = "value"
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_SCHEMA_ERRORS = (fastavro.schema.SchemaParseException, ValueError, TypeError, KeyError, AttributeError)


# -- the envelope schema ------------------------------------------------------


def _row_key_fields() -> list[dict[str, Any]]:
    """Fresh copies of the key-metadata fields from schemas/encrypted_envelope.avsc."""
    fields = copy.deepcopy(load_schema(ENVELOPE_SCHEMA)["fields"])
    if [f["name"] for f in fields] != [VERSION_FIELD, DEK_FIELD]:
        raise RuntimeError(f"{ENVELOPE_SCHEMA}.avsc must define exactly {VERSION_FIELD!r} and {DEK_FIELD!r}")
    return fields


# -- argument checks ----------------------------------------------------------


def _record_fields(schema: object, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(schema, Mapping):
        raise TypeError(f"{what} must be an Avro record schema as a dict, not {type(schema).__name__}")
    if schema.get("type") != "record":
        raise ValueError(f"{what} must be an Avro record schema (type 'record'), not type {schema.get('type')!r}")
    fields = schema.get("fields")
    if not isinstance(fields, list) or not all(
        isinstance(f, Mapping) and isinstance(f.get("name"), str) for f in fields
    ):
        raise ValueError(f"{what} needs a 'fields' list of field objects, each with a 'name'")
    names = [f["name"] for f in fields]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} declares the field(s) {twice} more than once")
    return fields


def _name_list(names: object, what: str) -> list[str]:
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of field names, not one string (did you mean [{names!r}]?)")
    out = list(names)  # type: ignore[call-overload]
    for n in out:
        if not isinstance(n, str):
            raise TypeError(f"{what} must hold field names (str), not {type(n).__name__}")
    twice = sorted({n for n in out if out.count(n) > 1})
    if twice:
        raise ValueError(f"{what} names {twice} more than once")
    return out


def _record_list(records: object, what: str = "records") -> list[Mapping[str, Any]]:
    if isinstance(records, Mapping):
        raise TypeError(f"{what} must be a sequence of records (dicts), not one record")
    out = list(records)  # type: ignore[call-overload]
    for i, rec in enumerate(out):
        if not isinstance(rec, Mapping):
            raise TypeError(f"record {i} is a {type(rec).__name__}, not a dict")
    return out


def _short(avro_type: object) -> str:
    text = json.dumps(avro_type, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


# -- plain types: cell serialization ------------------------------------------


def _walk(t: object, defined: set[str], referenced: set[str]) -> None:
    """Collect named types defined and referenced in a parsed (fully qualified) type."""
    if isinstance(t, list):
        for member in t:
            _walk(member, defined, referenced)
    elif isinstance(t, str):
        if t not in _PRIMITIVES:
            referenced.add(t)
    elif isinstance(t, Mapping):
        kind = t.get("type")
        if kind in ("record", "error"):
            defined.add(t["name"])
            for f in t.get("fields", []):
                _walk(f["type"], defined, referenced)
        elif kind in ("enum", "fixed"):
            defined.add(t["name"])
        elif kind == "array":
            _walk(t["items"], defined, referenced)
        elif kind == "map":
            _walk(t["values"], defined, referenced)


def _accepts_null(t: object) -> bool:
    if isinstance(t, list):
        return "null" in t
    if isinstance(t, Mapping):
        return t.get("type") == "null"
    return t == "null"


class _PlainTypes:
    """A plain record schema parsed once: each top-level field's type, with all named types in scope."""

    def __init__(self, plain_schema: Mapping[str, Any]) -> None:
        self.named: dict[str, Any] = {}
        try:
            parsed = fastavro.parse_schema(dict(plain_schema), named_schemas=self.named)
        except _SCHEMA_ERRORS as exc:
            raise ValueError(f"not a valid Avro schema: {type(exc).__name__}: {exc}") from None
        if _CELL_RECORD in self.named:
            raise ValueError(f"the Avro name {_CELL_RECORD!r} is reserved by keyturn")
        self.record_name: str = parsed["name"]
        self.fields: dict[str, Mapping[str, Any]] = {f["name"]: f for f in parsed["fields"]}
        self.defines: dict[str, set[str]] = {}
        self.references: dict[str, set[str]] = {}
        for name, f in self.fields.items():
            self.defines[name], self.references[name] = set(), set()
            _walk(f["type"], self.defines[name], self.references[name])
        self._cells: dict[str, Any] = {}
        self.descriptors: dict[str, str] = {}  # sensitive field -> avro_type_descriptor of its type as written

    def check_hidden_types(self, sensitive: Sequence[str]) -> None:
        """`ValueError` if a clear field needs a named type that encryption hides."""
        hidden = {t: name for name in sensitive for t in self.defines[name]}
        for name in self.fields:
            if name in sensitive:
                continue
            for t in sorted(self.references[name]):
                if t == self.record_name:
                    raise ValueError(
                        f"field {name!r} refers to the record type {t!r} itself; the encrypted schema keeps the "
                        f"record name, so that reference would change meaning. Encrypt {name!r} too."
                    )
                if t in hidden:
                    raise ValueError(
                        f"field {name!r} uses the named type {t!r}, which is defined inside the sensitive field "
                        f"{hidden[t]!r}; encrypting {hidden[t]!r} removes that definition from the schema. "
                        f"Encrypt {name!r} too, or define {t!r} in a field that stays in clear."
                    )

    def prepare(self, names: Sequence[str]) -> None:
        """Build the cell schemas of `names` now; `ValueError` if a type cannot be serialized alone."""
        for name in names:
            cell_field = {"name": _CELL_FIELD, "type": self.fields[name]["type"]}
            wrapper = {"type": "record", "name": _CELL_RECORD, "fields": [cell_field]}
            try:
                self._cells[name] = fastavro.parse_schema(wrapper, named_schemas=dict(self.named))
            except _SCHEMA_ERRORS as exc:
                problem = f"{type(exc).__name__}: {exc}"
                raise ValueError(f"the type of field {name!r} cannot be serialized: {problem}") from None

    def _cell_schema(self, name: str) -> Any:
        if name not in self._cells:
            self.prepare([name])
        return self._cells[name]  # a one-field record encodes exactly as its field

    def encode(self, record: Mapping[str, Any], name: str, index: int) -> bytes | None:
        """Avro bytes of `record[name]` (its default if absent); None for null. `ValueError` on a mismatch."""
        f = self.fields[name]
        value = record[name] if name in record else f.get("default")
        if value is None:
            if not _accepts_null(f["type"]):
                raise ValueError(
                    f"record {index}: field {name!r} is null or missing, but its Avro type {_short(f['type'])} "
                    "does not allow null"
                )
            return None
        schema = self._cell_schema(name)
        datum = {_CELL_FIELD: value}
        try:
            ok = _avro_validate(datum, schema, raise_errors=False)
            if ok:
                buf = io.BytesIO()
                fastavro.schemaless_writer(buf, schema, datum)
                return buf.getvalue()
        except Exception:  # fastavro raises many types; never echo the value
            pass
        raise ValueError(
            f"record {index}: the value of field {name!r} does not match its Avro type {_short(f['type'])}"
        )

    def decode(self, name: str, data: bytes | None) -> Any:
        """Inverse of `encode`; `DecryptionError` unless `data` is exactly one value of the type."""
        if data is None:
            if not _accepts_null(self.fields[name]["type"]):
                raise DecryptionError()
            return None
        buf = io.BytesIO(data)
        try:
            value = fastavro.schemaless_reader(buf, self._cell_schema(name), None)[_CELL_FIELD]
        except Exception:  # any failure to parse is bad data, never a crash
            raise DecryptionError() from None
        if buf.tell() != len(data):
            raise DecryptionError()
        return value


# -- schemas ------------------------------------------------------------------


def _derive(
    plain_schema: Mapping[str, Any], sensitive_fields: Sequence[str], bind_fields: Sequence[str]
) -> tuple[dict[str, Any], _PlainTypes, list[str], list[str]]:
    fields = _record_fields(plain_schema, "plain_schema")
    sensitive = _name_list(sensitive_fields, "sensitive_fields")
    binds = _name_list(bind_fields, "bind_fields")
    if not sensitive:
        raise ValueError("name at least one field to encrypt")
    names = [f["name"] for f in fields]
    reserved = [n for n in names if n.startswith(_RESERVED_PREFIX)]
    if reserved:
        raise ValueError(
            f"plain_schema already has the reserved field(s) {reserved}: is it encrypted already? "
            "(plain_schema_of(encrypted_schema) recovers the plain schema)"
        )
    marked = [f["name"] for f in fields if any(str(k).startswith(_PROP_PREFIX) for k in f)]
    if marked:
        raise ValueError(f"field(s) {marked} already carry keyturn.* properties: is the schema encrypted already?")
    for what, group in (("sensitive_fields", sensitive), ("bind_fields", binds)):
        unknown = [n for n in group if n not in names]
        if unknown:
            raise ValueError(
                f"{what}: {unknown} not top-level fields of record {plain_schema.get('name')!r} "
                f"(fields: {names}); to encrypt a nested path, name its top-level field"
            )
    overlap = [n for n in binds if n in sensitive]
    if overlap:
        raise ValueError(f"bind fields must stay in clear, so they cannot also be sensitive: {overlap}")
    types = _PlainTypes(plain_schema)
    types.check_hidden_types(sensitive)
    types.prepare(sensitive + binds)
    by_name = {f["name"]: f for f in fields}
    for name in sensitive:
        types.descriptors[name] = avro_type_descriptor(by_name[name]["type"])

    out_fields: list[dict[str, Any]] = []
    for f in fields:
        if f["name"] in sensitive:
            rest = {k: copy.deepcopy(v) for k, v in f.items() if k not in ("name", "type", "default")}
            out_fields.append(
                {
                    "name": f["name"],
                    "type": ["null", "bytes"],
                    "default": None,
                    **rest,
                    FORMAT_PROP: _FORMAT,
                    PLAIN_TYPE_PROP: copy.deepcopy(f["type"]),
                    BIND_PROP: list(binds),
                }
            )
        else:
            out_fields.append(copy.deepcopy(dict(f)))
    out_fields.extend(_row_key_fields())
    derived = {k: copy.deepcopy(v) for k, v in plain_schema.items() if k != "fields" and k not in _FASTAVRO_KEYS}
    derived["fields"] = out_fields
    return derived, types, sensitive, binds


def derive_encrypted_schema(
    plain_schema: Mapping[str, Any], sensitive_fields: Sequence[str], *, bind_fields: Sequence[str] = ()
) -> dict[str, Any]:
    """The encrypted form of `plain_schema` (see the module docstring); `ValueError` on bad arguments.

    `sensitive_fields` and `bind_fields` name top-level fields; bind fields
    stay in clear and are bound into every cell of their record.
    """
    return _derive(plain_schema, sensitive_fields, bind_fields)[0]


def encrypted_fields(encrypted_schema: Mapping[str, Any]) -> list[str]:
    """Names of the fields keyturn encrypted, in schema order."""
    return [f["name"] for f in _record_fields(encrypted_schema, "encrypted_schema") if FORMAT_PROP in f]


@dataclass
class _Layout:
    plain_schema: dict[str, Any]
    types: _PlainTypes
    binds: list[str]


def _encrypted_record_fields(encrypted_schema: object) -> list[Mapping[str, Any]]:
    """The fields of an encrypted schema; `ValueError` if it lacks the key-metadata fields."""
    fields = _record_fields(encrypted_schema, "encrypted_schema")
    names = [f["name"] for f in fields]
    if VERSION_FIELD not in names or DEK_FIELD not in names:
        raise ValueError(
            f"encrypted_schema has no {VERSION_FIELD!r}/{DEK_FIELD!r} fields, so it is not a keyturn-encrypted "
            "schema: pass the schema derive_encrypted_schema returned, or the writer schema of the encrypted file"
        )
    return fields


def _layout(encrypted_schema: Mapping[str, Any]) -> _Layout:
    fields = _encrypted_record_fields(encrypted_schema)
    names = [f["name"] for f in fields]
    out_fields: list[dict[str, Any]] = []
    binds: list[str] = []
    descriptors: dict[str, str] = {}
    for f in fields:
        name = f["name"]
        if name in (VERSION_FIELD, DEK_FIELD):
            continue
        if FORMAT_PROP not in f:
            out_fields.append(copy.deepcopy(dict(f)))
            continue
        if f[FORMAT_PROP] != _FORMAT:
            raise ValueError(
                f"field {name!r} uses keyturn format {f[FORMAT_PROP]!r}; this version reads format {_FORMAT!r}"
            )
        if PLAIN_TYPE_PROP not in f:
            raise ValueError(f"encrypted field {name!r} has no {PLAIN_TYPE_PROP!r} property")
        bind = f.get(BIND_PROP, [])
        if not isinstance(bind, list) or not all(isinstance(b, str) for b in bind):
            raise ValueError(f"{BIND_PROP!r} of field {name!r} must be a list of field names")
        for b in bind:
            if b not in names or b in (VERSION_FIELD, DEK_FIELD) or FORMAT_PROP in fields[names.index(b)]:
                raise ValueError(f"field {name!r} is bound to {b!r}, which is not a clear field of the record")
            if b not in binds:
                binds.append(b)
        rest = {
            k: copy.deepcopy(v)
            for k, v in f.items()
            if k not in ("name", "type", "default") and not k.startswith(_PROP_PREFIX)
        }
        out_fields.append({"name": name, "type": copy.deepcopy(f[PLAIN_TYPE_PROP]), **rest})
        descriptors[name] = avro_type_descriptor(f[PLAIN_TYPE_PROP])
    plain = {k: copy.deepcopy(v) for k, v in encrypted_schema.items() if k != "fields" and k not in _FASTAVRO_KEYS}
    plain["fields"] = out_fields
    types = _PlainTypes(plain)
    types.prepare([f["name"] for f in fields if FORMAT_PROP in f] + binds)
    types.descriptors.update(descriptors)
    return _Layout(plain, types, binds)


def plain_schema_of(encrypted_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The plain schema an encrypted schema was derived from (sensitive fields lose their defaults).

    `ValueError` if it is not a keyturn-encrypted schema or its keyturn
    properties are damaged.
    """
    return _layout(encrypted_schema).plain_schema


# -- dataset contracts ----------------------------------------------------------


def _has_props(f: Mapping[str, Any]) -> bool:
    return any(str(k).startswith(_PROP_PREFIX) for k in f)


def _sealed_field(name: str, rest: Mapping[str, Any], plain_type: Any, binds: Sequence[str]) -> dict[str, Any]:
    """An encrypted field as `derive_encrypted_schema` writes it."""
    return {
        "name": name,
        "type": ["null", "bytes"],
        "default": None,
        **copy.deepcopy(dict(rest)),
        FORMAT_PROP: _FORMAT,
        PLAIN_TYPE_PROP: copy.deepcopy(plain_type),
        BIND_PROP: list(binds),
    }


@dataclass
class _ContractPlan:
    """How a contract reads records of one (untrusted) schema."""

    schema: dict[str, Any]  # contract_encrypted_schema: what re-encrypted records conform to
    layout_schema: dict[str, Any]  # the same with the keyturn properties of foreign fields removed (for `_layout`)
    descriptors: dict[str, str]  # contract field -> the descriptor its cells are bound to
    since: dict[str, int]  # contract field -> the contract revision that added it
    absent: set[str]  # contract fields the schema does not have
    as_stored: set[str]  # contract fields the schema declares in clear with the contract's plain type
    foreign: list[str]  # fields with keyturn properties that the contract does not name
    binds: list[str]


def _contract_plan(encrypted_schema: object, contract: DatasetContract) -> _ContractPlan:
    if not isinstance(contract, DatasetContract):
        raise TypeError(f"contract must be a DatasetContract, not {type(contract).__name__}")
    if contract.codec != "avro":
        raise ContractError(
            f"dataset {contract.dataset!r} holds {contract.codec} data; its contract cannot read Avro records"
        )
    fields = _record_fields(encrypted_schema, "encrypted_schema")
    assert isinstance(encrypted_schema, Mapping)
    plain_types: dict[str, Any] = {}
    for c in contract.columns:
        t = c.avro_type()
        try:
            descriptor: str | None = avro_type_descriptor(t)
        except ValueError:
            descriptor = None
        if descriptor != c.type_descriptor:
            raise ContractError(f"the contract's plain type of {c.name!r} does not match its type descriptor")
        plain_types[c.name] = t
    binds = list(contract.bind)
    body: list[dict[str, Any]] = []
    layout_body: list[dict[str, Any]] = []
    reserved: dict[str, dict[str, Any]] = {}
    as_stored: set[str] = set()
    foreign: list[str] = []
    for f in fields:
        name = f["name"]
        if name in (VERSION_FIELD, DEK_FIELD):
            reserved[name] = copy.deepcopy(dict(f))
        elif name in plain_types:
            rest = {k: v for k, v in f.items() if k not in ("name", "type", "default") and not str(k).startswith(_PROP_PREFIX)}
            sealed = _sealed_field(name, rest, plain_types[name], binds)
            body.append(sealed)
            layout_body.append(copy.deepcopy(sealed))
            try:
                stored_descriptor: str | None = avro_type_descriptor(f.get("type"))
            except ValueError:
                stored_descriptor = None
            if not _has_props(f) and stored_descriptor == contract.column(name).type_descriptor:
                as_stored.add(name)
        elif _has_props(f):
            foreign.append(name)
            body.append(copy.deepcopy(dict(f)))
            layout_body.append({k: copy.deepcopy(v) for k, v in f.items() if not str(k).startswith(_PROP_PREFIX)})
        else:
            body.append(copy.deepcopy(dict(f)))
            layout_body.append(copy.deepcopy(dict(f)))
    present = {f["name"] for f in fields}
    absent = {name for name in plain_types if name not in present}
    for name in contract.names:  # contract fields the schema lacks: null in every record
        if name in absent:
            sealed = _sealed_field(name, {}, plain_types[name], binds)
            body.append(sealed)
            layout_body.append(copy.deepcopy(sealed))
    canonical = {f["name"]: f for f in _row_key_fields()}
    tail = [reserved.get(n, canonical[n]) for n in (VERSION_FIELD, DEK_FIELD)]
    top = {k: copy.deepcopy(v) for k, v in encrypted_schema.items() if k != "fields" and k not in _FASTAVRO_KEYS}
    schema = {**top, "fields": body + copy.deepcopy(tail)}
    layout_schema = {**copy.deepcopy(top), "fields": layout_body + copy.deepcopy(tail)}
    return _ContractPlan(
        schema,
        layout_schema,
        {c.name: c.type_descriptor for c in contract.columns},
        {c.name: c.since_revision for c in contract.columns},
        absent,
        as_stored,
        foreign,
        binds,
    )


def contract_encrypted_schema(encrypted_schema: Mapping[str, Any], contract: DatasetContract) -> dict[str, Any]:
    """The encrypted schema `contract` reads `encrypted_schema` as, and `reencrypt_records` writes.

    Every contract field becomes ``["null", "bytes"]`` (default null) with
    the contract's ``keyturn.plain_type`` and ``keyturn.bind``, whatever the
    schema said; contract fields the schema lacks are added; the key-metadata
    fields are added if missing. Other fields are kept as they are.
    `ContractError` for a contract of another codec or a damaged contract.
    """
    return _contract_plan(encrypted_schema, contract).schema


def _stored_values(
    rec: Mapping[str, Any], index: int, revision: int | None, plan: _ContractPlan, types: _PlainTypes
) -> dict[str, Any] | None:
    """The contract fields of one readable record that are not decrypted (as null); None if the record is corrupt.

    A field its DEK's contract revision requires must be ciphertext (bytes or
    None) in a field the schema has. A field that joined the contract after
    the DEK was born reads as null when the schema lacks it or declares it in
    clear (a clear value there is never returned: nothing proves it genuine),
    and is decrypted otherwise.
    """
    out: dict[str, Any] = {}
    for name, since in plan.since.items():
        required = revision is None or revision >= since
        value = rec.get(name)
        if name in plan.absent:
            if required or not _accepts_null(types.fields[name]["type"]):
                return None
            out[name] = None
        elif required or name not in plan.as_stored:
            if value is not None and type(value) is not bytes:  # a forged plaintext where ciphertext belongs
                return None
        else:  # a clear value in a field that joined the contract after the DEK: never returned (it may be forged)
            out[name] = None
    return out


# -- encrypt ------------------------------------------------------------------


def encrypt_records(
    records: Sequence[Mapping[str, Any]],
    plain_schema: Mapping[str, Any],
    sensitive_fields: Sequence[str],
    scope: DekScope,
    *,
    bind_fields: Sequence[str] = (),
    contract: DatasetContract | None = None,
) -> list[dict[str, Any]]:
    """Encrypt `sensitive_fields` of `records` under `scope`, in one `seal_rows` call.

    Returns new dicts conforming to `derive_encrypted_schema(plain_schema,
    sensitive_fields, bind_fields=bind_fields)`; clear fields are copied as
    they are. `ValueError` (naming record and field, never the value) if a
    sensitive or bind value does not match its Avro type. With the dataset's
    `contract`, the fields, their plain types and the bind fields are first
    checked against it (`ContractError` before any KMS call), and exactly the
    contract's fields and binds are encrypted. An empty list makes no KMS call.
    """
    if contract is not None:
        fields = _record_fields(plain_schema, "plain_schema")
        check_avro_write(
            contract,
            {f["name"]: f["type"] for f in fields},
            _name_list(sensitive_fields, "sensitive_fields"),
            bind=_name_list(bind_fields, "bind_fields"),
        )
        sensitive_fields, bind_fields = list(contract.names), list(contract.bind)
    _, types, sensitive, binds = _derive(plain_schema, sensitive_fields, bind_fields)
    records = _record_list(records)
    for i, rec in enumerate(records):
        if VERSION_FIELD in rec or DEK_FIELD in rec:
            raise ValueError(f"record {i} already has keyturn key metadata: is it encrypted already?")
    columns = [[types.encode(rec, name, i) for i, rec in enumerate(records)] for name in sensitive]
    bindings = None
    if binds:
        bindings = []
        for i, rec in enumerate(records):
            encoded = {b: types.encode(rec, b, i) for b in binds}
            bindings.append({b: v for b, v in encoded.items() if v is not None})
    sealed = scope.seal_rows(sensitive, columns, bindings, types=[types.descriptors[name] for name in sensitive])
    version = scope.kek.version
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        new = dict(rec)
        for name, cells in zip(sensitive, sealed.cells):
            new[name] = cells[i]
        new[VERSION_FIELD] = version
        new[DEK_FIELD] = sealed.envelopes[sealed.row_envelope[i]]
        out.append(new)
    return out


# -- reading: per-record classification --------------------------------------


@dataclass
class _Keys:
    status: list[ReadStatus]
    versions: list[int | None]  # effective key versions (the directory's, with one); None where ill-typed
    envelopes: list[bytes | None]  # the records' own (birth) envelopes
    revisions: list[int | None]  # the DEKs' contract revisions; None without a directory


def _classify(
    records: Sequence[Mapping[str, Any]],
    policy: KeyPolicy,
    reader: DekReader | None = None,
    location: Location | None = None,
) -> _Keys:
    """Classify every record, against the reader's DEK directory when it has one.

    Ill-typed metadata classifies as corrupt. Without a directory (or without
    a `reader`), the records' own envelopes decide and `versions` are the
    records' own.
    """
    own: list[int | None] = []
    checked: list[int | None] = []
    envelopes: list[bytes | None] = []
    for rec in records:
        v = rec.get(VERSION_FIELD)
        env = rec.get(DEK_FIELD)
        ok = v is None or (isinstance(v, int) and not isinstance(v, bool))
        own.append(v if ok else None)
        checked.append(v if ok else 0)  # 0 never matches an envelope's version: corrupt
        if env is None or isinstance(env, bytes):
            envelopes.append(env)
        else:
            envelopes.append(bytes(env) if isinstance(env, (bytearray, memoryview)) else b"")
    entries = reader.entries(envelopes) if reader is not None and location is not None else None
    keys = classify_keys(policy, checked, envelopes, entries=entries, location=location if entries is not None else None)
    if entries is None:
        versions = own
    else:
        versions = [None if own[i] is None else v for i, v in enumerate(keys.versions)]
    return _Keys(keys.status, versions, envelopes, keys.revisions)


# -- decrypt ------------------------------------------------------------------


@dataclass
class AvroDecryptResult(StatusCounts):
    """Decrypted readable records, and a status for every input record."""

    plain: list[dict[str, Any]] = field(repr=False)
    plain_status: list[ReadStatus]
    status: list[ReadStatus]
    versions: list[int | None]  # effective key version per record (the directory's when the reader has one)
    schema: dict[str, Any] | None  # plain schema of `plain`; None if the schema's keyturn properties are damaged
    source: list[Mapping[str, Any]] = field(repr=False)

    def rows_with(self, *statuses: ReadStatus) -> list[Mapping[str, Any]]:
        """The original (still encrypted) input records having any of `statuses`."""
        wanted = set(statuses)
        return [self.source[i] for i, s in enumerate(self.status) if s in wanted]


def decrypt_records(
    records: Sequence[Mapping[str, Any]],
    encrypted_schema: Mapping[str, Any],
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    *,
    fields: Sequence[str] | None = None,
    contract: DatasetContract | None = None,
) -> AvroDecryptResult:
    """Decrypt the current and stale records; classify every record.

    `plain` holds the readable records in input order, conforming to
    `schema` (the plain schema, limited to `fields` if given). Damaged
    keyturn properties in `encrypted_schema` make every readable record
    corrupt. With the dataset's `contract` (codec ``avro``), the encrypted
    fields, their plain types and the bound fields come from the contract,
    never from the schema's properties (see the module docstring); fields
    with keyturn properties the contract does not name are left out of
    `plain`. With a DEK directory on `reader`, records are classified against
    it and `versions` are the directory's. KMS outages raise; bad data never
    does.
    """
    records = _record_list(records)
    plan: _ContractPlan | None = None
    if contract is not None:
        plan = _contract_plan(encrypted_schema, contract)
        sensitive = list(contract.names)
        layout_schema: Mapping[str, Any] = plan.layout_schema
    else:
        sensitive = [f["name"] for f in _encrypted_record_fields(encrypted_schema) if FORMAT_PROP in f]
        layout_schema = encrypted_schema
    wanted = sensitive if fields is None else _name_list(fields, "fields")
    unknown = [n for n in wanted if n not in sensitive]
    if unknown:
        raise ValueError(f"not encrypted fields of this schema: {unknown} (encrypted: {sensitive})")

    keys = _classify(records, policy, reader, location)
    status, envelopes = keys.status, keys.envelopes
    if plan is not None and plan.foreign:
        for i, rec in enumerate(records):  # cells no contract describes: never clear data
            if any(rec.get(name) is not None for name in plan.foreign):
                status[i] = ReadStatus.CORRUPT
    readable = [i for i, s in enumerate(status) if s.readable]
    try:
        layout: _Layout | None = _layout(layout_schema)
    except ValueError:
        layout = None
        for i in readable:
            status[i] = ReadStatus.CORRUPT
        readable = []
    if layout is not None and plan is not None:
        layout.types.descriptors.update(plan.descriptors)

    stored: dict[int, dict[str, Any]] = {}  # contract fields read as stored, per record
    if layout is not None and plan is not None:
        for i in readable:
            kept = _stored_values(records[i], i, keys.revisions[i], plan, layout.types)
            if kept is None:
                status[i] = ReadStatus.CORRUPT
            else:
                stored[i] = kept
        readable = [i for i in readable if status[i].readable]

    plain: list[dict[str, Any]] = []
    kept_rows: list[int] = []
    drop = set(plan.foreign) - set(plan.binds) if plan is not None else set()
    if layout is not None and readable:
        types = layout.types
        bindings: list[dict[str, bytes]] | None = None
        if layout.binds:
            bindings = [{} for _ in records]
            for i in readable:
                try:
                    encoded = {b: types.encode(records[i], b, i) for b in layout.binds}
                except ValueError:
                    status[i] = ReadStatus.CORRUPT
                    continue
                bindings[i] = {b: v for b, v in encoded.items() if v is not None}
            readable = [i for i in readable if status[i].readable]
        no_stored: dict[str, Any] = {}
        cells = [
            [None if name in stored.get(i, no_stored) else rec.get(name) for i, rec in enumerate(records)]
            for name in wanted
        ]
        descriptors = [types.descriptors[name] for name in wanted]  # untrusted without a contract: authenticated per cell
        opened = open_rows(reader, location, wanted, cells, envelopes, readable, bindings, types=descriptors)
        for i in readable:
            if i in opened.failed:
                status[i] = ReadStatus.CORRUPT
                continue
            as_stored = stored.get(i, no_stored)
            try:
                values = {
                    name: as_stored[name] if name in as_stored else types.decode(name, opened.values[j][i])
                    for j, name in enumerate(wanted)
                }
            except DecryptionError:
                status[i] = ReadStatus.CORRUPT
                continue
            row: dict[str, Any] = {}
            for key, value in records[i].items():
                if key in (VERSION_FIELD, DEK_FIELD) or key in drop or (key in sensitive and key not in values):
                    continue
                row[key] = values[key] if key in values else value
            for name in wanted:  # a sensitive field absent from the record decrypts as null
                row.setdefault(name, values[name])
            plain.append(row)
            kept_rows.append(i)

    schema = None
    if layout is not None:
        schema = dict(layout.plain_schema)
        schema["fields"] = [
            f
            for f in schema["fields"]
            if (f["name"] not in sensitive or f["name"] in wanted) and f["name"] not in drop
        ]
    return AvroDecryptResult(plain, [status[i] for i in kept_rows], status, keys.versions, schema, records)


# -- rewrap -------------------------------------------------------------------


@dataclass
class AvroRewrapResult(StatusCounts):
    """The records with stale envelopes re-wrapped under the active version."""

    records: list[Mapping[str, Any]] = field(repr=False)
    status: list[ReadStatus]
    deks_rewrapped: int
    kms_request_ids: list[str]


def rewrap_records(
    records: Sequence[Mapping[str, Any]], kms: KmsBackend, policy: KeyPolicy, location: Location
) -> AvroRewrapResult:
    """Re-wrap each distinct stale DEK once; cell bytes are untouched.

    Rewrapped records are new dicts with the new envelope and version; every
    other record is returned as it was (the same object), and `status` says
    why (a rewrapped record reports `stale`, its status before the rewrap).
    This re-wraps the envelopes the records carry; a DEK in a key home's
    directory is re-wrapped in the directory instead (`rewrap_entries`).
    """
    records = _record_list(records)
    keys = _classify(records, policy)
    status, envelopes = keys.status, keys.envelopes
    target = policy.active
    replaced, request_ids = rewrap_rows(kms, status, envelopes, location, target)
    out: list[Mapping[str, Any]] = list(records)
    for i, s in enumerate(status):
        if s is ReadStatus.STALE:
            new = dict(records[i])
            new[VERSION_FIELD] = target.version
            new[DEK_FIELD] = replaced[envelopes[i]]  # type: ignore[index]
            out[i] = new
    return AvroRewrapResult(out, status, sum(1 for v in replaced.values() if v is not None), request_ids)


# -- re-encrypt ---------------------------------------------------------------


@dataclass
class AvroReencryptResult(StatusCounts):
    """The records with readable ones sealed under fresh DEKs, the others untouched."""

    records: list[Mapping[str, Any]] = field(repr=False)
    status: list[ReadStatus]


def reencrypt_records(
    records: Sequence[Mapping[str, Any]],
    encrypted_schema: Mapping[str, Any],
    reader: DekReader,
    scope: DekScope,
    policy: KeyPolicy,
    location: Location,
    *,
    contract: DatasetContract | None = None,
) -> AvroReencryptResult:
    """Decrypt readable records and seal them again under `scope` (a fresh DEK).

    Unreadable records (retired, unknown, missing, corrupt) are kept as they
    were (the same objects, with the envelope their cells name), in place, so
    a rewrite never loses them. Order is kept. Re-encrypted records conform
    to `encrypted_schema`, or with the dataset's `contract` to
    `contract_encrypted_schema(encrypted_schema, contract)`: the contract's
    fields and binds are sealed (see `decrypt_records`).
    """
    if scope.location != location:
        raise ValueError("the scope must belong to the same location as the records")
    records = _record_list(records)
    decrypted = decrypt_records(records, encrypted_schema, reader, policy, location, contract=contract)
    readable = [i for i, s in enumerate(decrypted.status) if s.readable]
    if not readable:
        return AvroReencryptResult(list(records), decrypted.status)
    foreign: list[str] = []
    if contract is not None:
        plan = _contract_plan(encrypted_schema, contract)
        layout = _layout(plan.layout_schema)
        sensitive, binds = list(contract.names), list(contract.bind)
        foreign = [name for name in plan.foreign if name not in binds]
    else:
        layout = _layout(encrypted_schema)
        sensitive, binds = encrypted_fields(encrypted_schema), layout.binds
    sealed = encrypt_records(decrypted.plain, layout.plain_schema, sensitive, scope, bind_fields=binds, contract=contract)
    out: list[Mapping[str, Any]] = list(records)
    for i, rec in zip(readable, sealed):
        for name in foreign:  # left out of `plain`; null in every readable record
            rec.setdefault(name, None)
        out[i] = rec
    return AvroReencryptResult(out, decrypted.status)
