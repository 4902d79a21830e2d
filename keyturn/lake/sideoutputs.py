"""Side-output files: Avro containers under ``<lake>/_keyturn/<kind>/``.

A job that writes a lake keeps its side outputs in that lake. A job that
only *reads* a lake (decrypt) must not write into it: its side outputs go
under its output (a `Lake` rooted at the output: ``<out>/_keyturn/<kind>/``)
or into a directory the user names, `SideOutputDir` (``<dir>/<kind>/``).
Every function here takes either.

Kinds and schemas: ``audit`` (schemas/audit_event.avsc), ``mismatch``
(version_mismatch.avsc) and ``quarantine`` (quarantine_record.avsc).

A job writes its records for one unit of work (one rewritten file) as soon
as that unit is committed, to ``<run-id>.part-<token>.avro``, so a crash
loses nothing already done. `compact_parts` then merges a run's parts into
``<run-id>.avro`` (written atomically, duplicates dropped, parts deleted);
a crashed run's parts are merged by the next run. Readers should read every
``*.avro`` file of a kind (`read_side_outputs`); records are deduplicated by
content, since audit and mismatch event ids are deterministic.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import fastavro
import pyarrow.fs as pafs

from keyturn.lake.atomic import fsync_dir
from keyturn.lake.layout import Lake, temp_name_for
from keyturn.schemas import load_schema

__all__ = ["SCHEMA_OF", "SideOutputDir", "write_side_output", "read_side_outputs", "compact_parts", "part_name"]

SCHEMA_OF = {"audit": "audit_event", "mismatch": "version_mismatch", "quarantine": "quarantine_record"}
PART_MARK = ".part-"


class SideOutputDir(Lake):
    """A directory that holds side outputs directly, ``<root>/<kind>/<name>.avro`` (no ``_keyturn/`` level).

    Made from a `Lake` (`SideOutputDir.of(lake)`), so it shares its
    filesystem and S3 settings and pickles to Beam workers the same way. It
    is not a lake: it lists no data files and has no lock.
    """

    @classmethod
    def of(cls, lake: Lake) -> SideOutputDir:
        out = object.__new__(cls)
        out.__dict__.update(lake.__dict__)
        return out

    def __repr__(self) -> str:
        return f"SideOutputDir({self.uri!r})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        restore, args = super().__reduce__()
        return (_restore_side_output_dir, (restore, args))

    def keyturn_path(self, *parts: str) -> str:
        return self.path(*parts)

    def data_files(self) -> list:  # type: ignore[override]
        return []

    def lock(self, **_options: Any):  # type: ignore[no-untyped-def, override]
        raise TypeError("a side-output directory is not a lake and has no lock")


def _restore_side_output_dir(restore: Any, args: tuple) -> SideOutputDir:
    return SideOutputDir.of(restore(*args))


def part_name(run_id: str, token: str) -> str:
    return f"{run_id}{PART_MARK}{token}"


def _write_avro(lake: Lake, path: str, kind: str, records: list[Mapping[str, Any]]) -> None:
    """Write an Avro container atomically (temp name, fsync, rename, fsync dir)."""
    buf = io.BytesIO()
    fastavro.writer(buf, load_schema(SCHEMA_OF[kind]), records, codec="deflate")
    directory = posixpath.dirname(path)
    lake.fs.create_dir(directory, recursive=True)
    temp = posixpath.join(directory, temp_name_for(posixpath.basename(path)))
    if lake.is_local:
        import os

        with open(temp, "xb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
    else:
        with lake.fs.open_output_stream(temp) as out:
            out.write(buf.getvalue())
    lake.fs.move(temp, path)
    fsync_dir(lake, directory)


def write_side_output(lake: Lake, kind: str, name: str, records: Iterable[Mapping[str, Any]]) -> str | None:
    """Write `records` to ``_keyturn/<kind>/<name>.avro``; returns the path, or None if there were none."""
    records = list(records)
    if not records:
        return None
    path = lake.side_output_path(kind, name)
    _write_avro(lake, path, kind, records)
    return path


def _files(lake: Lake, kind: str) -> list[str]:
    directory = lake.keyturn_path(kind)
    infos = lake.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".avro") and not posixpath.basename(i.path).startswith(".")
    )


def _read(lake: Lake, path: str) -> list[dict[str, Any]]:
    with lake.fs.open_input_file(path) as f:
        return list(fastavro.reader(io.BytesIO(f.read())))


def _key(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))


def _dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in records:
        k = _key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def read_side_outputs(lake: Lake, kind: str, *, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every record of `kind` (of one run if `run_id` is given), duplicates dropped."""
    records: list[dict[str, Any]] = []
    for path in _files(lake, kind):
        stem = posixpath.basename(path)[: -len(".avro")]
        if run_id is not None and stem.split(PART_MARK)[0] != run_id:
            continue
        records.extend(_read(lake, path))
    return _dedupe(records)


def compact_parts(lake: Lake, kind: str, *, run_id: str | None = None) -> list[str]:
    """Merge part files into ``<run-id>.avro`` per run (all runs, or one); returns the merged paths."""
    runs: dict[str, list[str]] = {}
    for path in _files(lake, kind):
        stem = posixpath.basename(path)[: -len(".avro")]
        if PART_MARK in stem:
            run = stem.split(PART_MARK)[0]
            if run_id is None or run == run_id:
                runs.setdefault(run, []).append(path)
    merged = []
    for run, parts in sorted(runs.items()):
        target = lake.side_output_path(kind, run)
        records: list[dict[str, Any]] = []
        if lake.fs.get_file_info(target).type == pafs.FileType.File:
            records.extend(_read(lake, target))
        for part in parts:
            records.extend(_read(lake, part))
        _write_avro(lake, target, kind, _dedupe(records))
        for part in parts:  # the merged file is durable first: a crash here leaves duplicates, never a loss
            try:
                lake.fs.delete_file(part)
            except FileNotFoundError:
                pass
        merged.append(target)
    return merged
