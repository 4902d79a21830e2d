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
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from keyturn.crash import crashpoint
from keyturn.errors import InputError, LakeError
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
    "heartbeat",
    "check_run_id",
    "commit_run_marker",
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


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FUTURE_SLACK_SECONDS = 300


def check_run_id(run_id: object) -> str:
    """`InputError` unless `run_id` is one visible path name (letters, digits, ``_ . -``; no ``..``)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise InputError(
            f"run id {run_id!r} must be 1-128 letters, digits, '_', '.' or '-', start with a letter or digit "
            "and not contain '..' (it names a directory under _keyturn/staging)"
        )
    return run_id


def begin_run(
    lake: Lake, run_id: str, *, process: bool = True, now: Callable[[], float] = time.time
) -> str:
    """Create the staging directory of run `run_id` with its owner record; returns the directory.

    `process=False` (a Beam pipeline, whose files come from many worker
    processes) records no process: the run is then live for
    `STALE_RUN_SECONDS` after it began.
    """
    run_dir = lake.keyturn_path(STAGING, check_run_id(run_id))
    owner: dict[str, Any] = process_identity() if process else {"kind": "beam"}
    owner["began_at"] = owner["seen_at"] = now()
    write_json_atomically(lake, posixpath.join(run_dir, OWNER_FILE), owner)
    return run_dir


def heartbeat(lake: Lake, run_id: str, *, now: Callable[[], float] = time.time) -> None:
    """Record that run `run_id`'s owner is still at work (a Beam run, whose liveness is its age)."""
    run_dir = lake.keyturn_path(STAGING, check_run_id(run_id))
    owner = dict(_owner_of(lake, run_dir) or {"kind": "beam", "began_at": now()})
    owner["seen_at"] = now()
    write_json_atomically(lake, posixpath.join(run_dir, OWNER_FILE), owner)


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
    checkable = isinstance(owner.get("pid"), int) and bool(owner.get("start"))  # a pid alone may be reused
    state = holder_state(dict(owner)) if checkable else "unknown"
    if state != "unknown":
        return state == "alive"
    stamps = [t for t in (owner.get("began_at"), owner.get("seen_at")) if isinstance(t, (int, float)) and not isinstance(t, bool)]
    when = now()
    if not stamps or max(stamps) > when + _FUTURE_SLACK_SECONDS:  # no time, or one from the future: forged
        return False
    return when - max(stamps) < STALE_RUN_SECONDS


def _marker(lake: Lake, run_dir: str) -> dict[str, Any] | None:
    """The run's commit marker, None if it has none; `LakeError` naming the run if it is not one keyturn wrote."""
    path = posixpath.join(run_dir, COMMIT_MARKER)
    if lake.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with lake.fs.open_input_stream(path) as f:
            marker = json.loads(f.read())
    except (OSError, ValueError):
        marker = None
    paths = marker.get("paths") if isinstance(marker, dict) else None
    sources = marker.get("sources") if isinstance(marker, dict) else None
    if (
        not isinstance(marker, dict)
        or (paths is not None and not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)))
        or not isinstance(sources or {}, dict)
    ):
        raise LakeError(
            f"the commit marker of staged run {lake.relpath(run_dir)} is not one keyturn wrote; "
            "inspect that directory and remove it (nothing of it was published)"
        )
    return marker


def commit_run_marker(lake: Lake, run_dir: str, run_id: str, paths: list[str], sources: Mapping[str, Any] | None = None) -> None:
    """Commit the run: its marker lists exactly the staged files (relative to `run_dir`) to publish."""
    write_json_atomically(
        lake, posixpath.join(run_dir, COMMIT_MARKER),
        {"run_id": run_id, "files": len(paths), "paths": sorted(paths), "sources": dict(sources or {})},
    )


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
        marker = _marker(lake, run_dir)
        no_owner_file = fs.get_file_info(posixpath.join(run_dir, OWNER_FILE)).type == pafs.FileType.NotFound
        if marker is None and no_owner_file and not staged_files(lake, run_dir):
            continue  # being born (its owner record not yet in place), or empty: nothing to discard
        if marker is not None:
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

    Only the files its marker lists (a marker without a list, from an older
    keyturn, publishes every staged file): a file that turned up after the
    commit (a late retried bundle, a planted file) is never published.
    Idempotent, also when two processes publish one run at once (its owner
    and a recovery): a staged file another one already moved is skipped.
    """
    marker = _marker(lake, run_dir)
    listed = None if marker is None or marker.get("paths") is None else {lake.path(_run_rel(lake, run_dir, p)) for p in marker["paths"]}
    moved = []
    for staged, final in staged_files(lake, run_dir):
        if listed is not None and staged not in listed:
            continue
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


def _run_rel(lake: Lake, run_dir: str, rel: str) -> str:
    """`rel` (a marker's path, relative to `run_dir`) as a lake-relative path; `LakeError` if it leaves the run."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise LakeError(f"the commit marker of staged run {lake.relpath(run_dir)} lists {rel!r}, which is not a file of the run")
    return posixpath.join(lake.relpath(run_dir), rel)
