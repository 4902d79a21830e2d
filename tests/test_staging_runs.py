"""Staged runs and recovery: a run that may still be working is never discarded or published under it.

Writers hold the lake lock shared, so two `keyturn encrypt` runs (or an
encrypt and a Beam `WriteLake`) stage at once; each begins by recovering
earlier runs. `recover_staging` must leave a live run alone, roll a dead
committed run forward, and discard a dead uncommitted one.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys

import pyarrow as pa
import pytest

from keyturn.lake import staging

from keyturn.lake.atomic import write_json_atomically, write_parquet_atomically
from keyturn.lake.layout import Lake
from keyturn.lake.staging import (
    COMMIT_MARKER,
    OWNER_FILE,
    STAGING,
    STALE_RUN_SECONDS,
    begin_run,
    publish,
    recover_staging,
    run_is_live,
)


def _stage(lake: Lake, run_dir: str, partition: str = "region=1", rows: int = 3) -> str:
    path = posixpath.join(run_dir, partition, "part-1.parquet.staged")
    write_parquet_atomically(lake, path, pa.table({"id": list(range(rows))}), None)
    return path


def _dead_run(lake: Lake, run_id: str) -> str:
    """A run begun by a process that has exited since (its owner record names that process)."""
    code = (
        "import sys; from keyturn.lake.layout import Lake; from keyturn.lake.staging import begin_run; "
        "begin_run(Lake(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, lake.root, run_id], check=True)
    return lake.keyturn_path(STAGING, run_id)


def test_a_run_of_a_live_process_is_left_alone(tmp_path):
    lake = Lake(tmp_path / "lake")
    run_dir = begin_run(lake, "mine")
    staged = _stage(lake, run_dir)
    assert run_is_live(lake, run_dir)
    assert recover_staging(lake) == {"rolled_forward_files": 0, "discarded_runs": 0, "live_runs": 1}
    assert os.path.exists(staged) and lake.data_files() == []


def test_a_dead_uncommitted_run_is_discarded_and_a_dead_committed_one_rolled_forward(tmp_path):
    lake = Lake(tmp_path / "lake")
    uncommitted = _dead_run(lake, "crashed-before-commit")
    _stage(lake, uncommitted)
    committed = _dead_run(lake, "crashed-after-commit")
    _stage(lake, committed, "region=2", rows=5)
    write_json_atomically(lake, posixpath.join(committed, COMMIT_MARKER), {"run_id": "crashed-after-commit", "files": 1})
    assert not run_is_live(lake, uncommitted) and not run_is_live(lake, committed)
    assert recover_staging(lake) == {"rolled_forward_files": 1, "discarded_runs": 1, "live_runs": 0}
    assert [f.partition for f in lake.data_files()] == ["region=2"]
    assert not os.path.exists(lake.keyturn_path(STAGING, "crashed-before-commit"))


def test_a_run_whose_owner_cannot_be_checked_is_live_until_it_is_stale(tmp_path):
    lake = Lake(tmp_path / "lake")
    began = 1_000_000.0
    run_dir = begin_run(lake, "beam", process=False, now=lambda: began)
    _stage(lake, run_dir)
    assert run_is_live(lake, run_dir, now=lambda: began + STALE_RUN_SECONDS - 1)
    assert recover_staging(lake, now=lambda: began + 60)["live_runs"] == 1
    assert recover_staging(lake, now=lambda: began + STALE_RUN_SECONDS + 1)["discarded_runs"] == 1
    # another host's process: its pid means nothing here, so the same age rule holds
    other = begin_run(lake, "elsewhere", now=lambda: began)
    with open(posixpath.join(other, OWNER_FILE), "w") as f:
        f.write('{"pid": 1, "host": "another-host", "began_at": %r}' % began)
    assert run_is_live(lake, other, now=lambda: began + 1)
    assert not run_is_live(lake, other, now=lambda: began + STALE_RUN_SECONDS + 1)


def test_a_run_without_an_owner_record_is_not_live(tmp_path):
    lake = Lake(tmp_path / "lake")
    legacy = lake.keyturn_path(STAGING, "from-an-older-keyturn")
    _stage(lake, legacy)
    assert not run_is_live(lake, legacy)
    with open(posixpath.join(begin_run(lake, "torn"), OWNER_FILE), "w") as f:
        f.write("{not json")
    assert not run_is_live(lake, lake.keyturn_path(STAGING, "torn"))
    assert recover_staging(lake)["discarded_runs"] == 2


def test_publishing_a_run_twice_at_once_is_harmless(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    run_dir = begin_run(lake, "run")
    first = _stage(lake, run_dir, "region=1")
    _stage(lake, run_dir, "region=2")
    write_json_atomically(lake, posixpath.join(run_dir, COMMIT_MARKER), {"run_id": "run", "files": 2})
    listed = staging.staged_files(lake, run_dir)
    # the other publisher moves the first file after this one listed it, before this one moves it
    os.makedirs(lake.path("region=1"), exist_ok=True)
    os.rename(first, lake.path("region=1", "part-1.parquet"))
    monkeypatch.setattr(staging, "staged_files", lambda lake, run_dir: listed)
    assert publish(lake, run_dir) == [lake.path("region=2", "part-1.parquet")]
    assert sorted(f.partition for f in lake.data_files()) == ["region=1", "region=2"]


def test_a_staged_file_lost_before_publish_is_an_error(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    run_dir = begin_run(lake, "run")
    first = _stage(lake, run_dir, "region=1")
    listed = staging.staged_files(lake, run_dir)
    os.remove(first)  # gone from staging and not in the lake: never taken for "published by the other one"
    monkeypatch.setattr(staging, "staged_files", lambda lake, run_dir: listed)
    with pytest.raises(OSError):
        publish(lake, run_dir)
