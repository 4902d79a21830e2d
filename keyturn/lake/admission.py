"""What a keyturn lake admits: a batch that claims to be sealed output of this key home, checked without a KMS call.

Beam-free. `WriteLake` runs `admission_problems` on every batch before it
stages it, so nothing but genuine ciphertext of this dataset and partition
reaches a lake file with a ``keyturn`` footer. Type checks alone are not
enough: any binary column looks like ciphertext, and key columns can be
filled with nulls. So, beyond the contract's shape (`contract_violations`):

- the partition's hive keys are the contract's ``partition_by`` (cells are
  bound to their partition: under another one they would all read corrupt);
- no column shadows a contract column by case alone (case-insensitive
  engines would read the clear one);
- every row carries a key version and a DEK envelope, and every non-null
  cell of a contract column starts with the format version byte and the
  dek_id of its row's envelope;
- every DEK the batch names is in the key home's DEK directory, registered
  for this dataset and this partition, with the birth envelope the rows
  carry.

Cells are not decrypted here (no KMS call): a forged cell that copies a
genuine header still fails authentication when read, and reads as corrupt.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from keyturn.arrow_codec import contract_violations
from keyturn.contract import DatasetContract
from keyturn.directory import DekDirectory, entry_matches
from keyturn.errors import DecryptionError
from keyturn.format import DEK_FIELD, FORMAT_VERSION, VERSION_FIELD, Envelope, parse_envelope
from keyturn.lake.hive import hive_segments
from keyturn.scope import Location

__all__ = ["admission_problems"]

_VERSION_BYTE = bytes([FORMAT_VERSION])


def _envelopes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """(the row's envelope index, the distinct envelopes) of a ``_keyturn_dek`` column, dictionary or not."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(array.type):
        array = array.dictionary_encode()
    return array.indices, array.dictionary


def admission_problems(
    batch: pa.RecordBatch,
    partition: str,
    contract: DatasetContract,
    directory: DekDirectory,
    dataset: str,
) -> list[str]:
    """Why `batch` may not be written to partition `partition` of `dataset`'s lake; [] if it may."""
    problems = contract_violations(batch.schema, contract)
    problems += [f"key column {c!r} is missing" for c in (VERSION_FIELD, DEK_FIELD) if c not in batch.schema.names]
    if problems:
        return problems
    keys = [k for k, _ in hive_segments(partition)] if partition else []
    if contract.partition_by is not None and keys != list(contract.partition_by):
        problems.append(
            f"partition {partition!r} has hive keys {keys}, but the dataset is partitioned by {list(contract.partition_by)} "
            "(give WriteLake the keyed output of EncryptBatches, whose partitions its DEKs are bound to)"
        )
    wanted = {c.name.casefold(): c.name for c in contract.columns}
    problems += [
        f"column {name!r} differs from contract column {wanted[name.casefold()]!r} only by case"
        for name in batch.schema.names
        if name.casefold() in wanted and name != wanted[name.casefold()]
    ]
    if batch.num_rows == 0 or problems:
        return problems
    versions, deks = batch.column(VERSION_FIELD), batch.column(DEK_FIELD)
    if versions.null_count or deks.null_count:
        return problems + ["a row has no key version or no DEK envelope: it is not sealed output"]
    indices, distinct = _envelopes(deks)
    births: list[Envelope] = []
    for raw in distinct.to_pylist():
        try:
            births.append(parse_envelope(raw))
        except (DecryptionError, TypeError, ValueError):
            return problems + ["a row's DEK envelope does not parse"]
    prefixes = pa.array([_VERSION_BYTE + e.dek_id for e in births], pa.binary()).take(indices)
    for c in contract.columns:
        cells = batch.column(c.name)
        if cells.null_count == len(cells):
            continue
        head = pc.binary_slice(cells.cast(pa.binary()), 0, len(_VERSION_BYTE) + len(births[0].dek_id))
        same = pc.fill_null(pc.equal(head, prefixes), True)
        if not pc.all(same).as_py():
            problems.append(f"contract column {c.name!r} holds a value that is not a cell sealed under its row's DEK")
    if problems:
        return problems
    return problems + _directory_problems(births, directory, Location(dataset, partition))


def _directory_problems(births: list[Envelope], directory: DekDirectory, location: Location) -> list[str]:
    entries: Mapping[bytes, object] = directory.lookup_deks([e.dek_id for e in births])
    for birth in births:
        entry = entries.get(birth.dek_id)
        if entry is None:
            return [f"DEK {birth.dek_id.hex()} is not in the key home's DEK directory"]
        if not entry_matches(entry, birth, location):  # type: ignore[arg-type]
            return [
                f"DEK {birth.dek_id.hex()} is registered for another dataset or partition than "
                f"{location.dataset!r} / {location.partition!r}, or with another birth envelope"
            ]
    return []
