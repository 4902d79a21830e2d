"""Staged runs: data files staged under `_keyturn/staging/<run>/`, published only after a commit marker.

Beam-free. A run writes its files as ``<partition>/part-<uuid>.parquet.staged``
under its staging directory; `commit_marker` makes it durable, and
`publish` moves the files into the lake. `recover_staging` rolls committed
runs forward and discards the rest, so a crash at any point leaves either
all of a run or none of it.

Every run records its owner (`begin_run`: the process, as the lake lock
records holders, or, for a Beam `WriteLake` whose workers are not one
process, no process at all) with the time it began. Writers hold the lake
lock shared, so several runs stage at once: `recover_staging` leaves a run
alone while its owner may still be working on it, that is while the owner
process is alive, or, when that cannot be told (another host, a Beam run),
for `STALE_RUN_SECONDS` after it began. A run without an owner record
(written by an older keyturn, or torn before its first file) is discarded.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from keyturn.crash import crashpoint
from keyturn.lake.atomic import fsync_dir, write_json_atomically
from keyturn.lake.footer import read_footer
from keyturn.lake.layout import Lake, is_hidden
from keyturn.lake.ledger import record_sources
from keyturn.lake.lock import holder_state, process_identity

__all__ = [
    "STAGING",
    "STAGED_SUFFIX",
    "COMMIT_MARKER",
    "SKIPPED_FILE",
    "FAILED_FILE",
    "READ_FILE",
    "OWNER_FILE",
    "STALE_RUN_SECONDS",
    "begin_run",
    "run_is_live",
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


OWNER_FILE = "_owner.json"


STALE_RUN_SECONDS = 24 * 3600
"""How long an uncommitted run whose owner cannot be checked (another host, a Beam run) is left alone."""


def begin_run(
    lake: Lake, run_id: str, *, process: bool = True, now: Callable[[], float] = time.time
) -> str:
    """Create the staging directory of run `run_id` with its owner record; returns the directory.

    `process=False` (a Beam pipeline, whose files come from many worker
    processes) records no process: the run is then live for
    `STALE_RUN_SECONDS` after it began.
    """
    run_dir = lake.keyturn_path(STAGING, run_id)
    owner: dict[str, Any] = process_identity() if process else {"kind": "beam"}
    owner["began_at"] = now()
    write_json_atomically(lake, posixpath.join(run_dir, OWNER_FILE), owner)
    return run_dir


def _owner_of(lake: Lake, run_dir: str) -> Mapping[str, Any] | None:
    try:
        with lake.fs.open_input_stream(posixpath.join(run_dir, OWNER_FILE)) as f:
            owner = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def run_is_live(lake: Lake, run_dir: str, *, now: Callable[[], float] = time.time) -> bool:
    """Whether the run's owner may still be working on it (see the module docstring)."""
    owner = _owner_of(lake, run_dir)
    if owner is None:
        return False
    state = holder_state(dict(owner))
    if state != "unknown":
        return state == "alive"
    began = owner.get("began_at")
    if isinstance(began, bool) or not isinstance(began, (int, float)):
        return False
    return now() - began < STALE_RUN_SECONDS


def recover_staging(lake: Lake, *, now: Callable[[], float] = time.time) -> dict[str, int]:
    """Finish or undo other runs' staging: committed runs are rolled forward, dead uncommitted ones deleted.

    A run whose owner may still be working on it (`run_is_live`) is left
    alone, committed or not: its owner publishes it (and if it dies, a
    later recovery does). A committed run's marker may list source files
    (ingest); they are recorded in the source ledger as part of rolling
    forward, so a file is never ingested twice.
    """
    fs = lake.fs
    root = lake.keyturn_path(STAGING)
    out = {"rolled_forward_files": 0, "discarded_runs": 0, "live_runs": 0}
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return out
    for run_dir in sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory):
        if run_is_live(lake, run_dir, now=now):
            out["live_runs"] += 1
            continue
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
    """Move a committed run's staged files into the lake.

    Idempotent, also when two processes publish one run at once (its owner
    and a recovery): a staged file another one already moved is skipped.
    """
    moved = []
    for staged, final in staged_files(lake, run_dir):
        lake.fs.create_dir(posixpath.dirname(final), recursive=True)
        try:
            lake.fs.move(staged, final)
        except OSError:
            if lake.fs.get_file_info(staged).type == pafs.FileType.NotFound and lake.fs.get_file_info(final).type == pafs.FileType.File:
                continue  # moved by the other publisher
            raise
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
