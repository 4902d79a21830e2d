"""Staged runs: data files staged under `_keyturn/staging/<run>/`, published only after a commit marker.

Beam-free. A run writes its files as ``<partition>/part-<uuid>.parquet.staged``
under its staging directory; `commit_marker` makes it durable, and
`publish` moves the files into the lake. `recover_staging` rolls committed
runs forward and discards the rest, so a crash at any point leaves either
all of a run or none of it.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from keyturn.crash import crashpoint
from keyturn.lake.atomic import fsync_dir
from keyturn.lake.footer import read_footer
from keyturn.lake.layout import Lake, is_hidden
from keyturn.lake.ledger import record_sources

__all__ = [
    "STAGING",
    "STAGED_SUFFIX",
    "COMMIT_MARKER",
    "SKIPPED_FILE",
    "FAILED_FILE",
    "READ_FILE",
    "recover_staging",
    "staged_files",
    "publish",
    "read_json",
    "encrypted_partitions",
]


STAGING = "staging"


STAGED_SUFFIX = ".staged"
"""Staged data files end in ``.parquet.staged`` until published, so no ``*.parquet`` glob reaches them."""


COMMIT_MARKER = "_COMMITTED"


SKIPPED_FILE = "_skipped.json"


FAILED_FILE = "_failed.json"


READ_FILE = "_read.json"


def recover_staging(lake: Lake) -> dict[str, int]:
    """Finish or undo earlier runs' staging: committed runs are rolled forward, others deleted.

    A committed run's marker may list source files (ingest); they are
    recorded in the source ledger as part of rolling forward, so a file is
    never ingested twice.
    """
    fs = lake.fs
    root = lake.keyturn_path(STAGING)
    out = {"rolled_forward_files": 0, "discarded_runs": 0}
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return out
    for run_dir in sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory):
        marker_path = posixpath.join(run_dir, COMMIT_MARKER)
        if fs.get_file_info(marker_path).type == pafs.FileType.File:
            with fs.open_input_stream(marker_path) as f:
                marker = json.loads(f.read())
            out["rolled_forward_files"] += len(publish(lake, run_dir))
            record_sources(lake, marker.get("sources") or {})
        else:
            out["discarded_runs"] += 1
        fs.delete_dir(run_dir)
    return out


def staged_files(lake: Lake, run_dir: str) -> list[tuple[str, str]]:
    """`(staged path, final path)` for every finished data file under `run_dir`.

    Staged files are ``<partition>/part-<uuid>.parquet.staged`` (published
    without ``.staged``); a ``.parquet`` file is one staged by an older
    keyturn, still rolled forward. Temp files (``.keyturn-tmp-...``) and
    keyturn's ``_*.json`` lists are not data. A file under a hidden
    directory is never published as data (it would be invisible), so it is
    not counted as written either: the run's accounting refuses to commit.
    """
    fs = lake.fs
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(run_dir.rstrip("/")) + 1 :]
        if any(is_hidden(p) for p in rel.split("/")):
            continue
        if rel.endswith(".parquet" + STAGED_SUFFIX):
            final = rel[: -len(STAGED_SUFFIX)]
        elif rel.endswith(".parquet"):
            final = rel
        else:
            continue
        out.append((info.path, lake.path(final)))
    return sorted(out)


def publish(lake: Lake, run_dir: str) -> list[str]:
    """Move a committed run's staged files into the lake (idempotent: moved files are gone from staging)."""
    moved = []
    for staged, final in staged_files(lake, run_dir):
        lake.fs.create_dir(posixpath.dirname(final), recursive=True)
        lake.fs.move(staged, final)
        fsync_dir(lake, posixpath.dirname(final))
        moved.append(final)
        crashpoint("encrypt:mid-publish")
    return moved


def encrypted_partitions(lake: Lake) -> dict[str, int]:
    """Partitions holding at least one keyturn file -> their number of data files (reads footers only)."""
    by_partition: dict[str, list[str]] = {}
    for data_file in lake.data_files():
        by_partition.setdefault(data_file.partition, []).append(data_file.path)
    out: dict[str, int] = {}
    for partition, paths in by_partition.items():
        for path in paths:
            try:
                footer = read_footer(lake.fs, path)
            except (OSError, pa.ArrowException, ValueError):
                footer = None
            if footer is not None:
                out[partition] = len(paths)
                break
    return out


def read_json(lake: Lake, path: str) -> dict[str, int]:
    if lake.fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with lake.fs.open_input_stream(path) as f:
        return {str(k): int(v) for k, v in json.loads(f.read()).items()}
