"""Dataset contracts: which columns (or Avro fields) of a dataset are ciphertext, and as what.

A lake file is untrusted input: another engine drops field metadata, a
storage admin replaces a column. So the facts that decide security live in
the key registry, per dataset, in a `DatasetContract`:

- ``codec``: ``arrow`` (Arrow batches, Parquet lakes) or ``avro`` (records);
- ``columns``: each encrypted column with its plain field (Arrow: the
  base64 IPC schema of the field, as in ``keyturn.plain_field``; Avro: the
  JSON of the field's plain type) and the type descriptor bound into every
  cell, plus ``since_revision``, the contract revision that added it;
- ``bind``: the row-key columns bound into every cell;
- ``partition_by``: the hive partition columns of a lake written by the
  CLI (None when the writer gives partitions itself, as Beam keyed input does).

The first write to a dataset pins its contract (`KeyRegistry.pin_contract`,
insert-if-absent, so two first writers agree on one). Writers check their
input against it (`check_arrow_write`, `check_avro_write`) and refuse a
mismatch with `ContractError` before any DEK is made. Readers take the
encrypted columns, plain types and bindings from it, never from the file;
a contract column that is missing or not ciphertext makes the rows that need
it ``corrupt``. The contract changes only through `add_column`, an audited
verb (``keyturn dataset add-column``): it bumps the revision; rows under DEKs
born before a column was added do not need that column.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from typing import TYPE_CHECKING

from keyturn.avro_values import avro_type_descriptor
from keyturn.errors import ContractError, DecryptionError

if TYPE_CHECKING:  # Arrow is imported only by the Arrow functions, so the Avro path never loads pyarrow
    import pyarrow as pa

__all__ = [
    "ContractColumn",
    "DatasetContract",
    "CODECS",
    "arrow_contract",
    "avro_contract",
    "check_arrow_write",
    "check_avro_write",
    "add_column",
    "settle_arrow_contract",
]

CODECS = ("arrow", "avro")
_MAX_CONTRACT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ContractColumn:
    """One encrypted column: its plain field, the descriptor its cells are bound to, and when it joined."""

    name: str
    plain: str
    type_descriptor: str
    since_revision: int = 1

    def arrow_field(self) -> pa.Field:
        """The plain Arrow field (Arrow contracts only); `ContractError` if the stored field is damaged."""
        from keyturn.arrow_values import decode_plain_field

        try:
            f = decode_plain_field(self.plain.encode("ascii"))
        except (DecryptionError, UnicodeEncodeError):
            raise ContractError(f"the contract's plain field of {self.name!r} is damaged") from None
        if f.name != self.name:
            raise ContractError(f"the contract's plain field of {self.name!r} names {f.name!r}")
        return f

    def avro_type(self) -> Any:
        """The plain Avro type (Avro contracts only)."""
        try:
            return json.loads(self.plain)
        except ValueError:
            raise ContractError(f"the contract's plain type of {self.name!r} is damaged") from None


@dataclass(frozen=True, slots=True)
class DatasetContract:
    """What a dataset's writers must encrypt and its readers must find encrypted."""

    dataset: str
    codec: str
    columns: tuple[ContractColumn, ...]
    bind: tuple[str, ...] = ()
    partition_by: tuple[str, ...] | None = None
    revision: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ContractError("a contract needs a non-empty dataset name")
        if self.codec not in CODECS:
            raise ContractError(f"contract codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        names = [c.name for c in self.columns]
        if not names:
            raise ContractError(f"the contract of dataset {self.dataset!r} names no encrypted column")
        if len(set(names)) != len(names):
            raise ContractError(f"the contract of dataset {self.dataset!r} names a column twice")
        if set(names) & set(self.bind):
            raise ContractError("a bound row-key column cannot also be encrypted")
        if self.partition_by is not None and set(names) & set(self.partition_by):
            raise ContractError("a partition column cannot be encrypted")
        if self.revision < 1 or any(not 1 <= c.since_revision <= self.revision for c in self.columns):
            raise ContractError("contract revisions must be >= 1 and no column may be newer than the contract")

    @property
    def names(self) -> list[str]:
        """The encrypted column names, in contract order."""
        return [c.name for c in self.columns]

    def column(self, name: str) -> ContractColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def required_at(self, revision: int) -> list[str]:
        """Columns that must be ciphertext in rows under a DEK born at contract `revision`."""
        return [c.name for c in self.columns if c.since_revision <= revision]

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "codec": self.codec,
            "columns": [
                {"name": c.name, "plain": c.plain, "type": c.type_descriptor, "since": c.since_revision}
                for c in self.columns
            ],
            "bind": list(self.bind),
            "partition_by": None if self.partition_by is None else list(self.partition_by),
            "revision": self.revision,
        }

    def to_text(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> DatasetContract:
        """Parse a stored contract; `ContractError` if it is damaged."""
        if not isinstance(text, str) or len(text) > _MAX_CONTRACT_BYTES:
            raise ContractError("a stored dataset contract is damaged (not text, or too long)")
        try:
            doc = json.loads(text)
            columns = tuple(
                ContractColumn(str(c["name"]), str(c["plain"]), str(c["type"]), int(c["since"])) for c in doc["columns"]
            )
            partition_by = doc.get("partition_by")
            return cls(
                dataset=str(doc["dataset"]),
                codec=str(doc["codec"]),
                columns=columns,
                bind=tuple(str(b) for b in doc.get("bind", [])),
                partition_by=None if partition_by is None else tuple(str(p) for p in partition_by),
                revision=int(doc["revision"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, ContractError):
                raise
            raise ContractError(f"a stored dataset contract is damaged ({type(exc).__name__})") from None

    @classmethod
    def stored(cls, dataset: str, text: object) -> DatasetContract:
        """A contract as a registry stored it for `dataset`; `ContractError` if damaged or another dataset's."""
        contract = cls.from_text(text)  # type: ignore[arg-type]
        if contract.dataset != dataset:
            raise ContractError(f"the stored contract of dataset {dataset!r} names dataset {contract.dataset!r}")
        return contract

    def describe(self) -> str:
        """One line for messages: dataset, codec, columns with types."""
        cols = ", ".join(f"{c.name} ({c.type_descriptor.split(':', 1)[-1]})" for c in self.columns)
        extra = f"; bound to {', '.join(self.bind)}" if self.bind else ""
        parts = f"; partitioned by {', '.join(self.partition_by)}" if self.partition_by else ""
        return f"dataset {self.dataset!r} ({self.codec}, revision {self.revision}): encrypted {cols}{extra}{parts}"


# -- building a proposed contract from a first write ---------------------------


def arrow_contract(
    dataset: str,
    schema: pa.Schema,
    columns: Sequence[str],
    *,
    bind: Sequence[str] = (),
    partition_by: Sequence[str] | None = None,
) -> DatasetContract:
    """The contract a first Arrow write of `columns` (of plain `schema`) pins."""
    from keyturn.arrow_values import arrow_type_descriptor, encode_plain_field

    out = []
    for name in columns:
        if name not in schema.names:
            raise ContractError(f"column {name!r} is not in the data (columns: {', '.join(schema.names)})")
        f = schema.field(name)
        out.append(ContractColumn(name, encode_plain_field(_plain(f)).decode("ascii"), arrow_type_descriptor(f.type)))
    return DatasetContract(
        dataset, "arrow", tuple(out), tuple(bind), None if partition_by is None else tuple(partition_by)
    )


def avro_contract(
    dataset: str, plain_types: Mapping[str, Any], columns: Sequence[str], *, bind: Sequence[str] = ()
) -> DatasetContract:
    """The contract a first Avro write pins; `plain_types` maps each field name to its plain Avro type."""
    out = []
    for name in columns:
        if name not in plain_types:
            raise ContractError(f"field {name!r} is not in the record schema")
        t = plain_types[name]
        out.append(ContractColumn(name, json.dumps(t, sort_keys=True, separators=(",", ":")), avro_type_descriptor(t)))
    return DatasetContract(dataset, "avro", tuple(out), tuple(bind), None)


def _plain(f: pa.Field) -> pa.Field:
    """The field as a contract stores it: name, type and nullability (no engine-specific metadata)."""
    import pyarrow as pa

    return pa.field(f.name, f.type, nullable=f.nullable)


# -- checking a write against the pinned contract ------------------------------


def _check_common(
    contract: DatasetContract,
    codec: str,
    columns: Sequence[str],
    bind: Sequence[str],
    partition_by: Sequence[str] | None,
) -> None:
    if contract.codec != codec:
        raise ContractError(
            f"dataset {contract.dataset!r} holds {contract.codec} data; a {codec} writer may not write to it "
            "(use another dataset name)"
        )
    if list(columns) != contract.names:
        if set(columns) == set(contract.names):
            return _check_common(contract, codec, contract.names, bind, partition_by)
        raise ContractError(
            f"this write encrypts {', '.join(columns) or 'nothing'}, but the contract of dataset "
            f"{contract.dataset!r} says {', '.join(contract.names)}; the contract changes only through "
            "`keyturn dataset add-column`"
        )
    if tuple(bind) != contract.bind:
        raise ContractError(
            f"this write binds {', '.join(bind) or 'no row-key column'}, but the contract of dataset "
            f"{contract.dataset!r} binds {', '.join(contract.bind) or 'none'}"
        )
    if partition_by is not None and contract.partition_by is not None and tuple(partition_by) != contract.partition_by:
        raise ContractError(
            f"this write partitions by {', '.join(partition_by) or 'nothing'}, but dataset {contract.dataset!r} "
            f"is partitioned by {', '.join(contract.partition_by) or 'nothing'}"
        )
    return None


def check_arrow_write(
    contract: DatasetContract,
    schema: pa.Schema,
    columns: Sequence[str] | None = None,
    *,
    bind: Sequence[str] | None = None,
    partition_by: Sequence[str] | None = None,
) -> None:
    """Refuse (`ContractError`) plain data whose encrypted columns, types, bindings or partitions break `contract`.

    `columns` / `bind` default to the contract's own (a writer that does not
    say which columns it encrypts encrypts the contract's). Every contract
    column must be in `schema` with the contract's plain type.
    """
    from keyturn.arrow_values import arrow_type_descriptor

    _check_common(
        contract,
        "arrow",
        contract.names if columns is None else columns,
        contract.bind if bind is None else bind,
        partition_by,
    )
    for c in contract.columns:
        if c.name not in schema.names:
            raise ContractError(
                f"column {c.name!r} is missing from the data, but dataset {contract.dataset!r} requires it encrypted"
            )
        got = arrow_type_descriptor(schema.field(c.name).type)
        if got != c.type_descriptor:
            raise ContractError(
                f"column {c.name!r} has type {got.split(':', 1)[1]}, but dataset {contract.dataset!r} "
                f"stores it as {c.type_descriptor.split(':', 1)[1]}"
            )
    for b in contract.bind:
        if b not in schema.names:
            raise ContractError(f"bound row-key column {b!r} is missing from the data")


def check_avro_write(
    contract: DatasetContract,
    plain_types: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    *,
    bind: Sequence[str] | None = None,
) -> None:
    """The Avro twin of `check_arrow_write`: `plain_types` maps field name -> plain Avro type."""
    _check_common(
        contract, "avro", contract.names if columns is None else columns, contract.bind if bind is None else bind, None
    )
    for c in contract.columns:
        if c.name not in plain_types:
            raise ContractError(f"field {c.name!r} is missing from the schema, but dataset {contract.dataset!r} requires it")
        got = avro_type_descriptor(plain_types[c.name])
        if got != c.type_descriptor:
            raise ContractError(
                f"field {c.name!r} has type {got.split(':', 1)[1]}, but dataset {contract.dataset!r} "
                f"stores it as {c.type_descriptor.split(':', 1)[1]}"
            )


def add_column(contract: DatasetContract, column: ContractColumn) -> DatasetContract:
    """The next revision of `contract` with `column` encrypted from now on."""
    if column.name in contract.names:
        raise ContractError(f"column {column.name!r} is already encrypted in dataset {contract.dataset!r}")
    if column.name in contract.bind or (contract.partition_by and column.name in contract.partition_by):
        raise ContractError(f"column {column.name!r} is a row-key or partition column; it cannot be encrypted")
    revision = contract.revision + 1
    return replace(
        contract, columns=contract.columns + (replace(column, since_revision=revision),), revision=revision
    )


def settle_arrow_contract(
    store: Any,
    dataset: str,
    schema: pa.Schema,
    columns: Sequence[str],
    *,
    bind: Sequence[str] = (),
    partition_by: Sequence[str] | None = None,
    actor: str,
) -> DatasetContract:
    """The dataset's contract from the registry `store`, pinned from this write if it has none yet.

    `ContractError` if this write (its encrypted `columns` of plain
    `schema`, its row-key `bind` columns and hive `partition_by` columns)
    breaks the contract. Call it before any DEK is made.
    """
    existing = store.get_contract(dataset)
    if existing is None:
        existing = store.pin_contract(
            arrow_contract(dataset, schema, columns, bind=bind, partition_by=partition_by),
            actor=actor,
            reason=f"first write to dataset {dataset!r} pins its contract",
        )
    check_arrow_write(existing, schema, columns, bind=bind, partition_by=partition_by)
    return existing
