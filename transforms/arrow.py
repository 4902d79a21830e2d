"""Beam transforms over Arrow record batches keyed by partition.

Input elements are `(partition: str, batch: pyarrow.RecordBatch)`, or bare
`pyarrow.Table` / `pyarrow.RecordBatch` elements (what
`beam.io.ReadFromParquetBatched` yields), which belong to partition ""
(an unpartitioned dataset). With `partition_by=[columns]` each element is
split by those columns' values into hive partitions (``region=eu``, the
names a keyturn lake uses), and the columns leave the data, as with
``keyturn encrypt --partition-by`` (`keyturn.transforms.partition.KeyBatches`).
Anything else is refused with an `ElementTypeError` (an `InputError`) naming these forms: when the
pipeline is built if the PCollection's type hint already rules it out,
else when the element arrives. `EncryptBatches` settles the dataset
contract (partition columns included) before the first DEK exists.

A `KeyturnOutputs` (or `ReadLake`'s outputs) piped into a transform gives
it its `main`.

`output="tables"` makes `main` yield bare `pyarrow.Table`s instead of keyed
batches, with the partition's hive columns put back (as text, or cast to
`output_schema`, which also fixes the column order): what
`beam.io.WriteToParquetBatched(schema=...)` takes. For encrypted tables,
`keyturn.transforms.encrypted_schema` gives that schema.

Each transform returns `KeyturnOutputs`:

- `main`: `(partition, RecordBatch)`. EncryptBatches: the encrypted batch.
  DecryptBatches: the decrypted current (and by default stale) rows.
  ReencryptBatches: every input row, stale ones on the active version,
  unreadable ones unchanged.
- `version_mismatch`: `(event: dict, rows: RecordBatch)`: a
  VersionMismatchEvent (schemas/version_mismatch.avsc) and the encrypted
  rows it describes, one element per (reason, version) per input batch.
- `quarantine`: `dict` (schemas/quarantine_record.avsc); `payload` holds the
  original rows as an Arrow IPC stream, so nothing is dropped.
- `audit`: `dict` (schemas/audit_event.avsc), one per scope, with a
  deterministic id.

The DEK scope is one partition within one bundle (and window). Batches
travel with `RecordBatchCoder`, never through pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Dict, Tuple

import apache_beam as beam
import pyarrow as pa

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from keyturn.keysource import KeySource
from keyturn.policy import VersionRules
from keyturn.scope import ScopeLimits
from keyturn.transforms.adapters import ArrowAdapter
from keyturn.transforms.dofns import DecryptFn, EncryptFn, ReencryptFn
from keyturn.transforms.outputs import KeyturnOutputs, from_tagged
from keyturn.transforms.partition import AsTables, ContractSettle, KeyBatches, main_of
from keyturn.transforms.runners import check_runner
from keyturn.transforms.tags import AUDIT, MAIN, QUARANTINE, VERSION_MISMATCH

__all__ = ["EncryptBatches", "DecryptBatches", "ReencryptBatches", "keyturn_pardo", "OUTPUTS"]

Keyed = Tuple[str, pa.RecordBatch]


def keyturn_pardo(fn: beam.DoFn, main_type: Any, mismatch_type: Any) -> beam.ParDo:
    """A ParDo with keyturn's four typed outputs (so coders are chosen, not pickled)."""
    return (
        beam.ParDo(fn)
        .with_output_types(main_type, version_mismatch=mismatch_type, quarantine=Dict[str, Any], audit=Dict[str, Any])
        .with_outputs(VERSION_MISMATCH, QUARANTINE, AUDIT, main=MAIN)
    )


OUTPUTS = ("keyed", "tables")


class _BatchesTransform(beam.PTransform):
    """Keying step (bare or keyed input, `partition_by`), the keyturn DoFn, and the `output` form of `main`."""

    _fn: beam.DoFn
    _settle: ContractSettle | None = None

    def _configure(self, partition_by: Sequence[str] | str | None, output: str, output_schema: pa.Schema | None) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        if output_schema is not None and output != "tables":
            raise ValueError('output_schema applies to output="tables" only')
        self._key = KeyBatches(partition_by, what=type(self).__name__, settle=self._settle)
        self.partition_by = self._key.partition_by
        self.output = output
        self.output_schema = output_schema

    def expand(self, pcoll: beam.PCollection) -> KeyturnOutputs:
        pcoll = main_of(pcoll)  # KeyturnOutputs or ReadLake's outputs piped in: their main
        check_runner(pcoll.pipeline, type(self).__name__)
        keyed = pcoll | "Key" >> self._key
        out = from_tagged(keyed | "Keyturn" >> keyturn_pardo(self._fn, Keyed, Tuple[Dict[str, Any], pa.RecordBatch]))
        if self.output == "tables":
            out = out._replace(main=out.main | "AsTables" >> AsTables(self.output_schema))
        return out


class EncryptBatches(_BatchesTransform):
    """Encrypt `columns` of each batch, one DEK per partition scope.

    `partition_by`, `output` and `output_schema`: see the module docstring.
    Before the first DEK, each new input schema is checked against the
    dataset contract in the key home (`keyturn.contract.settle_arrow_contract`;
    the first write pins it, with `partition_by` as its partition columns, or
    none for bare input without it): a write that breaks it raises `ContractError`.
    """

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        columns: Sequence[str],
        *,
        partition_by: Sequence[str] | str | None = None,
        bind_columns: Sequence[str] = (),
        limits: ScopeLimits = ScopeLimits(),
        actor: str = "keyturn",
        reason: str = "encrypt",
        output: str = "keyed",
        output_schema: pa.Schema | None = None,
    ) -> None:
        super().__init__()
        if not columns:
            raise ValueError("name at least one column to encrypt")
        self._fn = EncryptFn(ArrowAdapter(columns, bind_columns), keys, dataset, limits=limits, actor=actor, reason=reason)
        self._settle = ContractSettle(keys, dataset, columns, bind_columns, actor)
        self._configure(partition_by, output, output_schema)
        if self.partition_by and set(self.partition_by) & set(columns):
            raise ValueError(f"a partition column cannot be encrypted: {sorted(set(self.partition_by) & set(columns))}")


class DecryptBatches(_BatchesTransform):
    """Decrypt batches; see the module docstring for the inputs and outputs.

    Rows are read under the partition they were encrypted in: keyed input
    names it (`ReadLake` yields the lake's), bare input is partition "" or,
    with `partition_by`, the hive path of those (plain) columns.

    `stale_to_main=False` sends stale rows only to `version_mismatch`.
    `columns` limits which encrypted columns are decrypted.
    `version_rules` (`keyturn.policy.VersionRules`): ``reject`` raises
    `VersionMismatchError` on missing/unknown rows instead of routing them.
    `rewrap_stale=True` (lazy rotation) re-wraps the stale DEKs read in the
    key home's directory; see `keyturn.transforms.dofns.DecryptFn`.
    """

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        *,
        columns: Sequence[str] | None = None,
        stale_to_main: bool = True,
        actor: str = "keyturn",
        reason: str = "decrypt",
        version_rules: VersionRules | None = None,
        rewrap_stale: bool = False,
        partition_by: Sequence[str] | str | None = None,
        output: str = "keyed",
        output_schema: pa.Schema | None = None,
    ) -> None:
        super().__init__()
        self._fn = DecryptFn(
            ArrowAdapter(decrypt_columns=columns), keys, dataset, stale_to_main=stale_to_main, actor=actor, reason=reason,
            version_rules=version_rules, rewrap_stale=rewrap_stale,
        )
        self._configure(partition_by, output, output_schema)


class ReencryptBatches(_BatchesTransform):
    """Move stale rows to the active key version: `rewrap`, `reencrypt` or `auto`.

    Inputs (keyed, bare, `partition_by`) and `output` as for `DecryptBatches`.
    """

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        *,
        mode: str = "rewrap",
        dek_max_age: timedelta = timedelta(days=365),
        limits: ScopeLimits = ScopeLimits(),
        actor: str = "keyturn",
        reason: str = "rotation",
        partition_by: Sequence[str] | str | None = None,
        output: str = "keyed",
        output_schema: pa.Schema | None = None,
    ) -> None:
        super().__init__()
        self._fn = ReencryptFn(
            ArrowAdapter(), keys, dataset, mode=mode, dek_max_age=dek_max_age, limits=limits, actor=actor, reason=reason
        )
        self._configure(partition_by, output, output_schema)
