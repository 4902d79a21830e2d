"""The lake layout: where data files, partitions and keyturn's own files live.

A lake is a directory tree of hive-partitioned Parquet files::

    <lake>/<partition>/part-<uuid>.parquet     data ("region=3", "a=1/b=2", or "" when unpartitioned)
    <lake>/_keyturn/mismatch/<run-id>.avro    keyturn's side outputs (also audit/, quarantine/)
    <lake>/_keyturn/lock                      the lake lock

A file or directory whose name starts with "." or "_" is never data
(pyarrow.dataset and Spark ignore them too), so temp files
(``.keyturn-tmp-...``) and ``_keyturn/`` are invisible to those readers.
DuckDB's globs do not skip hidden names, so no file keyturn writes ends in
``.parquet`` until it is data: temp files end in ``.tmp``
(``.keyturn-tmp-<uuid>-part-<uuid>.parquet.tmp``), staged files of an
encrypt or ingest run in ``.staged`` (see `keyturn.pipelines.encrypt`), and side
outputs are Avro. So ``read_parquet('<lake>/**/*.parquet')`` (or
``'<lake>/*/*.parquet'`` for one partition level) reads exactly the
committed data files. A bare ``'<lake>/**'`` also reaches keyturn's own
files under ``_keyturn/`` (Avro side outputs, JSON, the lock) and fails.
Partition columns are not stored inside the files; readers take them from
the path.

All file access goes through a `pyarrow.fs.FileSystem`, so the same code
serves a local directory and S3 (see `keyturn.lake.s3`); only fsync and
the lock special-case the filesystem (flock locally, a conditional-write
lease on S3).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from datetime import datetime, timezone
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from keyturn.errors import LakeError
from keyturn.fsutil import TEMP_PREFIX, TEMP_SUFFIX, is_temp_name, temp_name_for  # one temp-name scheme for every file
from keyturn.lake.lock import open_lock
from keyturn.lake.s3 import S3Settings, parse_s3_uri

__all__ = ["Lake", "DataFile", "TEMP_PREFIX", "TEMP_SUFFIX", "KEYTURN_DIR", "is_hidden", "is_temp_name", "temp_name_for", "as_lake"]

KEYTURN_DIR = "_keyturn"
SIDE_OUTPUT_KINDS = ("audit", "mismatch", "quarantine")


def is_hidden(name: str) -> bool:
    """True for names that are never data: they start with "." or "_"."""
    return name.startswith((".", "_"))


@dataclass(frozen=True, slots=True)
class DataFile:
    """One data file: its filesystem path, its path relative to the lake, its partition."""

    path: str
    relpath: str
    partition: str
    size: int
    mtime_ns: int | None


class Lake:
    """A Parquet lake rooted at `uri`: a local path, ``s3://bucket/prefix``, or another `pyarrow.fs` URI.

    ``s3://`` lakes get their endpoint and region from `s3` (an
    `keyturn.lake.s3.S3Settings`), the URI's query, or the AWS endpoint
    variables (see `keyturn.lake.s3`); the resolved settings are kept and
    pickled, so a Beam worker rebuilds the same filesystem. `lock_options`
    go to the S3 lease lock (``lease_seconds``...). An injected
    `filesystem` is used as is (a scheme and query in `uri` are stripped
    from the root) and is pickled with the lake.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        filesystem: pafs.FileSystem | None = None,
        *,
        s3: S3Settings | None = None,
        lock_options: dict[str, Any] | None = None,
    ) -> None:
        uri = os.fspath(uri)
        if not uri:
            raise ValueError("the lake path must be non-empty")
        self.uri = uri
        self.s3: S3Settings | None = None
        self.lock_options: dict[str, Any] = dict(lock_options or {})
        self._injected = filesystem is not None
        if filesystem is not None:
            if s3 is not None:
                raise ValueError("give a filesystem or S3 settings, not both")
            root = _strip_scheme(uri) if "://" in uri else uri
            self.fs, self.root = filesystem, root.rstrip("/") or "/"
        elif uri.startswith("s3://"):
            self.s3, self.root = parse_s3_uri(uri, s3)
            self.fs = self.s3.filesystem()
        elif "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
            self.root = root.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        fs = self.fs if self._injected or (self.s3 is None and not self.is_local) else None
        return (_restore_lake, (self.uri, self.root, self.s3, fs, self.lock_options))

    def sub(self, path: str, uri: str | None = None) -> Lake:
        """A lake on the same filesystem (same settings) rooted at `path`, a filesystem path (staging, outputs)."""
        other = object.__new__(Lake)
        other.uri = uri or (f"s3://{path}" if self.s3 is not None else path)
        other.s3, other._injected, other.fs = self.s3, self._injected, self.fs
        other.lock_options = dict(self.lock_options)
        other.root = path.rstrip("/") or "/"
        return other

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths ---------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` (joined with "/") under the lake root."""
        cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
        return posixpath.join(self.root, *cleaned) if cleaned else self.root

    def relpath(self, path: str) -> str:
        """`path` relative to the lake root (`LakeError` if it is outside)."""
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise LakeError(f"{path} is not inside the lake {self.uri}")
        return path[len(prefix):]

    @staticmethod
    def partition_of(relpath: str) -> str:
        """The hive partition path of a data file's relative path ("" at the top level)."""
        return posixpath.dirname(relpath)

    def keyturn_path(self, *parts: str) -> str:
        """A path under ``<lake>/_keyturn/``."""
        return self.path(KEYTURN_DIR, *parts)

    def side_output_path(self, kind: str, name: str) -> str:
        """``<lake>/_keyturn/<kind>/<name>.avro`` for kind audit, mismatch or quarantine."""
        if kind not in SIDE_OUTPUT_KINDS:
            raise ValueError(f"side-output kind must be one of {SIDE_OUTPUT_KINDS}, not {kind!r}")
        if not name or "/" in name or is_hidden(name):
            raise ValueError(f"bad side-output file name {name!r}")
        return self.keyturn_path(kind, f"{name}.avro")

    def new_data_path(self, partition: str) -> str:
        """A fresh ``<lake>/<partition>/part-<uuid>.parquet`` path."""
        return self.path(partition, f"part-{uuid.uuid4().hex}.parquet")

    # -- listing -------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def require(self) -> None:
        """`LakeError` unless the lake directory exists."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            raise LakeError(f"no lake at {self.uri}: the directory does not exist")
        if info.type != pafs.FileType.Directory:
            raise LakeError(f"{self.uri} is not a directory")

    def _walk(self) -> list[pafs.FileInfo]:
        if not self.exists():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))

    def data_files(self) -> list[DataFile]:
        """Every data file, sorted by relative path; hidden names (and what is under them) are skipped."""
        out = []
        for info in self._walk():
            if info.type != pafs.FileType.File:
                continue
            rel = self.relpath(info.path)
            if any(is_hidden(part) for part in rel.split("/")):
                continue
            out.append(DataFile(info.path, rel, self.partition_of(rel), info.size or 0, info.mtime_ns))
        out.sort(key=lambda f: f.relpath)
        return out

    def temp_files(self) -> list[str]:
        """Leftover ``.keyturn-tmp-*`` files in the lake (never data; old and new names).

        Not those under ``_keyturn/staging``: a staged run's temp files are
        its own (a Beam run stages without the lake lock), and go with the
        run when recovery discards it.
        """
        staging = self.keyturn_path("staging").rstrip("/") + "/"
        return sorted(
            info.path
            for info in self._walk()
            if info.type == pafs.FileType.File
            and is_temp_name(posixpath.basename(info.path))
            and not info.path.startswith(staging)
        )

    def remove_temp_files(self) -> list[str]:
        """Delete leftover temp files of crashed writers; returns their relative paths.

        A temp file is never data: the file it was meant to replace is intact
        until the rename. Only call this while holding the lake lock
        exclusively, or a running writer's temp file could disappear.
        """
        removed = []
        for path in self.temp_files():
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                continue
            removed.append(self.relpath(path))
        return removed

    def lock(self, *, exclusive: bool = True, owner: str = "keyturn", **options: Any):  # type: ignore[no-untyped-def]
        """The lake lock: `flock` on a local lake, a conditional-write lease on S3 (see `keyturn.lake.lock`)."""
        if self.is_s3:
            options = {**self.lock_options, **options}
        return open_lock(self, exclusive=exclusive, owner=owner, **options)


def _strip_scheme(uri: str) -> str:
    """``s3://bucket/prefix?query`` -> ``bucket/prefix``."""
    rest = uri.split("://", 1)[1]
    return rest.split("?", 1)[0]


def _restore_lake(
    uri: str, root: str, s3: S3Settings | None, fs: pafs.FileSystem | None, lock_options: dict[str, Any] | None = None
) -> Lake:
    lake = object.__new__(Lake)
    lake.lock_options = dict(lock_options or {})
    lake.uri, lake.root, lake.s3, lake._injected = uri, root, s3, fs is not None and s3 is None
    if fs is not None:
        lake.fs = fs
    elif s3 is not None:
        lake.fs = s3.filesystem()
    else:
        lake.fs = pafs.LocalFileSystem()
    return lake


def as_lake(lake: Lake | str | os.PathLike[str]) -> Lake:
    """`lake` itself if it is a `Lake`, else `Lake(lake)`."""
    return lake if isinstance(lake, Lake) else Lake(lake)


def new_run_id(now: datetime | None = None, *, prefix: str = "") -> str:
    """A sortable, unique run id: ``[<prefix>-]20250131T120000Z-1a2b3c4d`` (`now` defaults to the current UTC time)."""
    now = now or datetime.now(timezone.utc)
    stamp = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
    return f"{prefix}-{stamp}" if prefix else stamp
