"""The "keyturn" footer of a lake file, and file summaries read from footers alone.

Every encrypted Parquet file keyturn writes carries one key-value pair in
its footer metadata, key ``keyturn``, value JSON::

    {"format": 1, "dataset": "customers", "partition": "region=3",
     "rows": 1000, "versions": {"1": 400, "2": 600},
     "encrypted_columns": ["email", "ssn"],
     "deks": {"9f1c...(32 hex)": 400, "03ab...": 600}}

`versions` maps a key version to the number of rows under it (the rows'
own ``_keyturn_version``, the version their DEK was born under); rows
without version metadata (``missing``) are ``rows - sum(versions)``.
`deks` (optional; files written before it lack it) maps each dek_id to its
rows, so an inventory can count rows under the key version that wraps each
DEK *now*, from the key registry's DEK directory, reading only footers
(`pyarrow.parquet.read_metadata`), never data. Without `deks` (or when it
disagrees with the row count) the ``_keyturn_dek`` column is read instead:
its dictionary pages and indices, a few KB per row group.

`read_file_summary` trusts the footer only when it agrees with the Parquet
column statistics of ``_keyturn_version`` (same metadata read, no data
I/O). A file without the footer (written by another tool) falls back to
those statistics: row groups whose min equals max are counted exactly;
only a row group holding several versions has its version column read. A
file with neither is all ``missing``. A file whose footer cannot be read
at all gets `error` set and is never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datetime import datetime

from keyturn.errors import DecryptionError
from keyturn.format import DEK_FIELD, DEK_ID_BYTES, VERSION_FIELD, Envelope, parse_envelope
from keyturn.lake.layout import DataFile, Lake
from keyturn.policy import KeyPolicy, ReadStatus

__all__ = [
    "footer_of_batch",
    "strip_footer",
    "read_footer",
    "FOOTER_KEY",
    "FOOTER_FORMAT",
    "Footer",
    "FileSummary",
    "parse_footer",
    "count_versions",
    "schema_with_footer",
    "read_file_summary",
    "footer_for",
    "merge_counts",
    "envelope_rows",
    "dek_counts",
]

FOOTER_KEY = b"keyturn"
FOOTER_FORMAT = 1
_MAX_FOOTER_BYTES = 1 << 20


@dataclass(frozen=True)
class Footer:
    """The parsed ``keyturn`` footer of one file."""

    dataset: str
    partition: str
    rows: int
    versions: dict[int, int]
    encrypted_columns: list[str]
    deks: dict[bytes, int] | None = None

    @property
    def missing_rows(self) -> int:
        return self.rows - sum(self.versions.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FOOTER_FORMAT,
            "dataset": self.dataset,
            "partition": self.partition,
            "rows": self.rows,
            "versions": {str(v): n for v, n in sorted(self.versions.items())},
            "encrypted_columns": list(self.encrypted_columns),
            **({} if self.deks is None else {"deks": {d.hex(): n for d, n in sorted(self.deks.items())}}),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def parse_footer(raw: bytes | None) -> Footer | None:
    """The footer in `raw`, or None if absent or not a valid format-1 footer (never raises)."""
    if raw is None or len(raw) > _MAX_FOOTER_BYTES:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FOOTER_FORMAT:
            return None
        dataset, partition, rows = doc["dataset"], doc["partition"], doc["rows"]
        versions = {int(k): v for k, v in doc["versions"].items()}
        columns = doc["encrypted_columns"]
        deks = None if doc.get("deks") is None else {bytes.fromhex(k): v for k, v in doc["deks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (isinstance(dataset, str) and isinstance(partition, str) and _count(rows)):
        return None
    if not all(v >= 1 and _count(n) for v, n in versions.items()) or sum(versions.values()) > rows:
        return None
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        return None
    if deks is not None and (
        not all(len(d) == DEK_ID_BYTES and _count(n) for d, n in deks.items()) or sum(deks.values()) > rows
    ):
        return None
    return Footer(dataset, partition, rows, versions, columns, deks)


def _count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def count_versions(column: pa.Array | pa.ChunkedArray) -> tuple[dict[int, int], int]:
    """(rows per version, rows without a version) of a ``_keyturn_version`` column."""
    values = column.to_numpy(zero_copy_only=False) if column.null_count == 0 else None
    if values is None:
        valid = column.drop_null()
        values = valid.to_numpy(zero_copy_only=False)
        missing = column.null_count
    else:
        missing = 0
    if len(values) == 0:
        return {}, missing
    uniq, counts = np.unique(values.astype(np.int64), return_counts=True)
    return {int(v): int(n) for v, n in zip(uniq, counts)}, missing


def merge_counts(into: dict[int, int], more: Mapping[int, int]) -> dict[int, int]:
    for v, n in more.items():
        into[v] = into.get(v, 0) + n
    return into


def schema_with_footer(schema: pa.Schema, footer: Footer) -> pa.Schema:
    """`schema` with the footer set as its ``keyturn`` metadata (other metadata kept)."""
    meta = dict(schema.metadata or {})
    meta[FOOTER_KEY] = footer.to_bytes()
    return schema.with_metadata(meta)


# -- summaries ------------------------------------------------------------------


@dataclass
class FileSummary:
    """What an inventory knows about one data file, from its footer and statistics.

    `source` says where the counts came from: ``footer``, ``statistics``
    (no or disagreeing footer; column statistics, plus the version column of
    any mixed row group) or ``none`` (no version metadata at all: every row
    is missing). `error` is set, and the counts are zero, when the file's
    Parquet footer cannot be read.
    """

    path: str
    relpath: str
    partition: str
    size: int
    mtime_ns: int | None
    rows: int = 0
    versions: dict[int, int] = field(default_factory=dict)
    missing_rows: int = 0
    row_groups: int = 0
    encrypted_columns: list[str] = field(default_factory=list)
    dataset: str | None = None
    source: str = "none"
    error: str | None = None
    dek_rows: dict[bytes, int] = field(default_factory=dict, repr=False)
    births: dict[bytes, Envelope] | None = field(default=None, repr=False)
    unknown_rows: int = 0
    unknown_by_version: dict[int | None, int] = field(default_factory=dict)  # birth version (None: not known)
    corrupt_rows: int = 0
    effective: bool = False
    oldest_dek: datetime | None = None
    dek_revision: int | None = None
    schema: pa.Schema | None = field(default=None, repr=False)
    contract_problems: list[str] = field(default_factory=list)
    legacy_plain: list[str] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        return self.error is None

    def status_rows(self, policy: KeyPolicy) -> dict[str, int]:
        """Rows per read status (current, stale, retired, unknown, missing, corrupt)."""
        out = {s.value: 0 for s in ReadStatus}
        for version, n in self.versions.items():
            out[policy.classify(version).value] += n
        out[ReadStatus.MISSING.value] += self.missing_rows
        out[ReadStatus.UNKNOWN.value] += self.unknown_rows
        out[ReadStatus.CORRUPT.value] += self.corrupt_rows
        return out

    def stale_rows(self, policy: KeyPolicy) -> int:
        return sum(n for v, n in self.versions.items() if policy.classify(v) is ReadStatus.STALE)

    def needs_rewrite(self, policy: KeyPolicy) -> bool:
        """True if the file holds rows a rewrite can move onto the active version (stale rows)."""
        return self.readable and self.stale_rows(policy) > 0

    def is_current(self, policy: KeyPolicy) -> bool:
        """True if every row is on the active version."""
        return self.readable and self.rows == self.versions.get(policy.active.version, 0)

    def to_dict(self, policy: KeyPolicy | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.relpath,
            "partition": self.partition,
            "size": self.size,
            "rows": self.rows,
            "versions": {str(v): n for v, n in sorted(self.versions.items())},
            "missing_rows": self.missing_rows,
            "row_groups": self.row_groups,
            "encrypted_columns": list(self.encrypted_columns),
            "dataset": self.dataset,
            "source": self.source,
            "error": self.error,
            "unknown_rows": self.unknown_rows,
            "corrupt_rows": self.corrupt_rows,
            "versions_from": "directory" if self.effective else "file",
            "contract_problems": list(self.contract_problems),
        }
        if policy is not None:
            out["status_rows"] = self.status_rows(policy)
        return out


def _version_column_index(md: pq.FileMetaData) -> int | None:
    for i in range(md.num_columns):
        if md.schema.column(i).path == VERSION_FIELD:
            return i
    return None


def _stat_range(md: pq.FileMetaData, col: int) -> tuple[int, int] | None:
    """The (min, max) of the version column over all row groups, or None if any stat is absent."""
    lo = hi = None
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        stats = rg.column(col).statistics
        if rg.num_rows == 0:
            continue
        if stats is None or stats.null_count is None:
            return None
        if stats.null_count == rg.num_rows:
            continue
        if not stats.has_min_max:
            return None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return (lo, hi) if lo is not None else (0, 0)


def _footer_agrees(footer: Footer, md: pq.FileMetaData, col: int | None) -> bool:
    """Does the footer match the file: same row count, versions within the column statistics?"""
    if footer.rows != md.num_rows:
        return False
    if col is None:
        return not footer.versions
    rng = _stat_range(md, col)
    if rng is None:  # no statistics to check against: the footer is all there is
        return True
    if not footer.versions:
        return rng == (0, 0)
    return min(footer.versions) == rng[0] and max(footer.versions) == rng[1]


def _counts_from_statistics(pf: pq.ParquetFile, col: int) -> tuple[dict[int, int], int]:
    """Exact counts from statistics; reads the version column of mixed row groups only."""
    md = pf.metadata
    versions: dict[int, int] = {}
    missing = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        stats = rg.column(col).statistics
        if rg.num_rows == 0:
            continue
        if stats is not None and stats.null_count is not None:
            if stats.null_count == rg.num_rows:
                missing += rg.num_rows
                continue
            if stats.has_min_max and stats.min == stats.max:
                merge_counts(versions, {int(stats.min): rg.num_rows - stats.null_count})
                missing += stats.null_count
                continue
        table = pf.read_row_group(g, columns=[VERSION_FIELD])
        counted, nulls = count_versions(table.column(0))
        merge_counts(versions, counted)
        missing += nulls
    return versions, missing


def _encrypted_columns(schema: pa.Schema) -> list[str]:
    from keyturn.arrow_codec import encrypted_columns

    return encrypted_columns(schema)


def read_file_summary(lake: Lake, data_file: DataFile) -> FileSummary:
    """Summarize one data file from its footer (and statistics); never raises for bad files."""
    summary = FileSummary(data_file.path, data_file.relpath, data_file.partition, data_file.size, data_file.mtime_ns)
    try:
        with lake.fs.open_input_file(data_file.path) as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            summary.rows = md.num_rows
            summary.row_groups = md.num_row_groups
            footer = parse_footer((md.metadata or {}).get(FOOTER_KEY))
            col = _version_column_index(md)
            summary.schema = pf.schema_arrow
            if footer is not None and footer.deks is not None and sum(footer.deks.values()) == footer.rows - footer.missing_rows:
                summary.dek_rows = dict(footer.deks)
            else:
                summary.dek_rows, summary.births = _by_dek_id(envelope_rows(pf))
            if footer is not None and _footer_agrees(footer, md, col):
                summary.versions = dict(footer.versions)
                summary.missing_rows = footer.missing_rows
                summary.encrypted_columns = list(footer.encrypted_columns)
                summary.dataset = footer.dataset
                summary.source = "footer"
                return summary
            summary.encrypted_columns = _encrypted_columns(pf.schema_arrow)
            summary.dataset = footer.dataset if footer is not None else None
            if col is None:
                summary.missing_rows = md.num_rows
                summary.source = "none"
            else:
                summary.versions, summary.missing_rows = _counts_from_statistics(pf, col)
                summary.source = "statistics"
    except (OSError, pa.ArrowException, ValueError) as exc:
        summary.rows = summary.row_groups = summary.missing_rows = 0
        summary.versions = {}
        summary.error = f"not a readable Parquet file: {_one_line(exc)}"
    return summary


def _envelope_counts(column: pa.Array | pa.ChunkedArray, into: dict[bytes, int]) -> dict[bytes, int]:
    """Add rows per envelope of a ``_keyturn_dek`` column (dictionary-encoded or not) to `into`."""
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        indices = chunk.indices.drop_null().to_numpy(zero_copy_only=False)
        if len(indices) == 0:
            continue
        counts = np.bincount(indices, minlength=len(chunk.dictionary))
        for value, n in zip(chunk.dictionary.to_pylist(), counts.tolist()):
            if n and value is not None:
                into[bytes(value)] = into.get(bytes(value), 0) + n
    return into


def envelope_rows(pf: pq.ParquetFile) -> dict[bytes, int]:
    """Rows per DEK envelope, from the ``_keyturn_dek`` column alone (dictionary pages and indices)."""
    out: dict[bytes, int] = {}
    if DEK_FIELD in pf.schema_arrow.names:
        for g in range(pf.metadata.num_row_groups):
            if pf.metadata.row_group(g).num_rows:
                _envelope_counts(pf.read_row_group(g, columns=[DEK_FIELD]).column(0), out)
    return out


def _by_dek_id(envelopes: Mapping[bytes, int]) -> tuple[dict[bytes, int], dict[bytes, Envelope]]:
    """(rows per dek_id, birth envelope per dek_id) of rows per envelope; unparseable envelopes are left out."""
    rows: dict[bytes, int] = {}
    births: dict[bytes, Envelope] = {}
    for env, n in envelopes.items():
        try:
            birth = parse_envelope(env)
        except DecryptionError:
            continue
        rows[birth.dek_id] = rows.get(birth.dek_id, 0) + n
        births[birth.dek_id] = birth
    return rows, births


def dek_counts(table: pa.Table | pa.RecordBatch) -> dict[bytes, int]:
    """Rows per dek_id of an encrypted table or batch (for its footer); unparseable envelopes are left out."""
    if DEK_FIELD not in table.schema.names:
        return {}
    return _by_dek_id(_envelope_counts(table.column(DEK_FIELD), {}))[0]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def footer_for(
    dataset: str,
    partition: str,
    version_counts: Mapping[int, int],
    rows: int,
    encrypted: Iterable[str],
    deks: Mapping[bytes, int] | None = None,
) -> Footer:
    """Build a footer (validated the same way a parsed one is); `deks` maps dek_id -> rows (see `dek_counts`)."""
    footer = Footer(
        dataset,
        partition,
        rows,
        {int(v): int(n) for v, n in version_counts.items() if n},
        list(encrypted),
        None if deks is None else {bytes(d): int(n) for d, n in deks.items() if n},
    )
    if parse_footer(footer.to_bytes()) is None:
        raise ValueError(f"invalid footer: {footer.to_json()}")
    return footer


def footer_of_batch(batch: pa.RecordBatch | pa.Table, dataset: str, partition: str) -> Footer:
    """The footer of a lake file holding exactly `batch`: rows per key version and per DEK, encrypted columns."""
    versions, _ = count_versions(batch.column(VERSION_FIELD)) if VERSION_FIELD in batch.schema.names else ({}, 0)
    return footer_for(dataset, partition, versions, batch.num_rows, _encrypted_columns(batch.schema), dek_counts(batch))


def strip_footer(schema: pa.Schema) -> pa.Schema:
    """`schema` without the ``keyturn`` footer key (it describes one file, not the data)."""
    meta = dict(schema.metadata or {})
    if FOOTER_KEY not in meta:
        return schema
    del meta[FOOTER_KEY]
    return schema.with_metadata(meta) if meta else schema.remove_metadata()


def read_footer(fs: pafs.FileSystem, path: str) -> Footer | None:
    """The file's footer, or None if it has no valid one; reads the Parquet footer only (I/O errors raise)."""
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata.metadata or {}
    return parse_footer(meta.get(FOOTER_KEY))
