"""Beam transforms over Arrow record batches keyed by partition.

Input elements are `(partition: str, batch: pyarrow.RecordBatch)`. Each
transform returns `KeyturnOutputs`:

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
from keyturn.transforms.tags import AUDIT, MAIN, QUARANTINE, VERSION_MISMATCH

__all__ = ["EncryptBatches", "DecryptBatches", "ReencryptBatches", "keyturn_pardo"]

Keyed = Tuple[str, pa.RecordBatch]


def keyturn_pardo(fn: beam.DoFn, main_type: Any, mismatch_type: Any) -> beam.ParDo:
    """A ParDo with keyturn's four typed outputs (so coders are chosen, not pickled)."""
    return (
        beam.ParDo(fn)
        .with_output_types(main_type, version_mismatch=mismatch_type, quarantine=Dict[str, Any], audit=Dict[str, Any])
        .with_outputs(VERSION_MISMATCH, QUARANTINE, AUDIT, main=MAIN)
    )


class EncryptBatches(beam.PTransform):
    """Encrypt `columns` of each batch, one DEK per partition scope."""

    def __init__(
        self,
        keys: KeySource,
        dataset: str,
        columns: Sequence[str],
        *,
        bind_columns: Sequence[str] = (),
        limits: ScopeLimits = ScopeLimits(),
        actor: str = "keyturn",
        reason: str = "encrypt",
    ) -> None:
        super().__init__()
        if not columns:
            raise ValueError("name at least one column to encrypt")
        self._fn = EncryptFn(ArrowAdapter(columns, bind_columns), keys, dataset, limits=limits, actor=actor, reason=reason)

    def expand(self, pcoll: beam.PCollection) -> KeyturnOutputs:
        return from_tagged(pcoll | keyturn_pardo(self._fn, Keyed, Tuple[Dict[str, Any], pa.RecordBatch]))


class DecryptBatches(beam.PTransform):
    """Decrypt batches; see the module docstring for the outputs.

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
    ) -> None:
        super().__init__()
        self._fn = DecryptFn(
            ArrowAdapter(decrypt_columns=columns), keys, dataset, stale_to_main=stale_to_main, actor=actor, reason=reason,
            version_rules=version_rules, rewrap_stale=rewrap_stale,
        )

    def expand(self, pcoll: beam.PCollection) -> KeyturnOutputs:
        return from_tagged(pcoll | keyturn_pardo(self._fn, Keyed, Tuple[Dict[str, Any], pa.RecordBatch]))


class ReencryptBatches(beam.PTransform):
    """Move stale rows to the active key version: `rewrap`, `reencrypt` or `auto`."""

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
    ) -> None:
        super().__init__()
        self._fn = ReencryptFn(
            ArrowAdapter(), keys, dataset, mode=mode, dek_max_age=dek_max_age, limits=limits, actor=actor, reason=reason
        )

    def expand(self, pcoll: beam.PCollection) -> KeyturnOutputs:
        return from_tagged(pcoll | keyturn_pardo(self._fn, Keyed, Tuple[Dict[str, Any], pa.RecordBatch]))
