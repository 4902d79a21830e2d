"""Crash safety: SIGKILL the reencrypt job and `keyturn rewrap` at every crashpoint, then check nothing was lost.

Each lake case runs ``keyturn reencrypt`` in a subprocess with
``KEYTURN_CRASHPOINT`` set (see `keyturn.crash`), checks the process
died by SIGKILL, and then checks the lake as any reader would find it:
readable by pyarrow.dataset with the same non-sensitive data and layout,
and every source row decrypting exactly once with its original values. A
second run without a crashpoint must finish the job and leave no temp or
part files behind.

Rotation itself never rewrites the lake: the directory cases kill
``keyturn rewrap`` (and its alias ``reencrypt --mode rewrap``) between the
KMS re-wrap of a DEK and the swap of its directory entry, with some entries
already moved, and check that every row still decrypts, that a rerun
finishes, that status is then 100% current, and that no lake byte (nor
mtime) changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import run_cli
from pipeline_support import cli_command, set_config
from keyturn.audit.chain import verify_chain
from keyturn.crash import CRASHPOINTS
from keyturn.lake import Lake
from keyturn.lake.sideoutputs import read_side_outputs
from lake_support import (
    build_lake,
    file_versions,
    hive_view,
    make_home,
    plain_equal,
    rotate,
    snapshot,
    source_table,
    temp_files,
)
from keyturn.pipelines import reencrypt
from keyturn.pipelines import status as status_job

pytestmark = pytest.mark.beam

ROOT = Path(__file__).resolve().parent.parent
ROWS, PARTITIONS, FILES_PER_PARTITION = 240, 3, 2
DEKS = PARTITIONS * FILES_PER_PARTITION  # build_lake: one DEK scope per file

# The reencrypt job on the lake: (crashpoint, hits to let pass first, mode, what the crash must leave behind)
CASES = [
    ("run:after-lock", 0, "reencrypt", None),
    ("run:after-inventory", 0, "reencrypt", None),
    ("rewrite:before-write", 1, "reencrypt", None),
    ("rewrite:mid-write", 1, "reencrypt", "temp"),
    ("rewrite:before-swap", 1, "reencrypt", "temp"),
    ("rewrite:after-swap", 1, "reencrypt", "swapped"),
    ("rewrite:after-side-outputs", 1, "reencrypt", "part"),
    ("run:before-report", 0, "reencrypt", "all-swapped"),
    # the alias mode re-wraps the directory first (no lake byte), then reaches the report
    ("run:before-report", 0, "rewrap", "directory-rewrapped"),
]

# Re-wrapping the DEK directory: (crashpoint, hits to let pass first, command). Before the crash a clean
# `rewrap --max-deks PRE_MOVED` moves some entries, so the crash comes in the middle of a rotation.
PRE_MOVED = 2
DIRECTORY_CASES = [
    ("rewrap:before-swap", 2, "rewrap"),
    ("rewrap:before-swap", 0, "rewrap"),
    ("rewrap:before-swap", 3, "reencrypt-alias"),
]


def test_every_crashpoint_is_exercised():
    assert {c[0] for c in CASES} | {c[0] for c in DIRECTORY_CASES} == set(CRASHPOINTS)


@pytest.fixture
def setup(tmp_path):
    home = make_home(str(tmp_path / "home"))
    source = source_table(ROWS, PARTITIONS)
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=FILES_PER_PARTITION, row_group_size=15)
    rotate(home)
    assert home.registry().deks_by_version() == {1: DEKS}
    set_config(home.path, "lifecycle", max_concurrent_reencryption_workers=1)  # one file in flight at a time
    return home, lake, source


def _crash(cmd, point, skip):
    env = {**os.environ, "KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": str(skip)}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _run_crashing(lake, home, point, skip, mode):
    cmd = cli_command("--home", home.path, "reencrypt", "--lake", lake.uri, "--mode", mode)
    return _crash(cmd, point, skip)


def data_files_state(lake_dir: str) -> dict[str, tuple[bytes, int]]:
    """Data files only (no hidden or _keyturn files): relative path -> (bytes, mtime_ns)."""
    data = {f.relpath for f in Lake(lake_dir).data_files()}
    return {rel: state for rel, state in snapshot(lake_dir).items() if rel in data}


def _status(home, lake):
    return status_job.run(home=home, lake=lake.uri)


@pytest.mark.parametrize("point,skip,mode,leaves", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_sigkill_at_crashpoint_loses_nothing(setup, point, skip, mode, leaves):
    home, lake, source = setup
    hive_before = hive_view(lake.uri)
    versions_before = file_versions(lake.uri)
    data_before = data_files_state(lake.uri)

    proc = _run_crashing(lake, home, point, skip, mode)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # what the crash left behind proves it happened where it should
    versions = file_versions(lake.uri)
    moved = [rel for rel, v in versions.items() if v == {2: 40}]
    if leaves == "temp":
        assert len(temp_files(lake.uri)) == 1
        assert len(moved) == skip
    elif leaves == "swapped":
        assert len(moved) == skip + 1 and temp_files(lake.uri) == []
    elif leaves == "part":
        parts = os.listdir(lake.keyturn_path("audit"))
        assert len(parts) == skip + 1 and all(".part-" in p for p in parts)
    elif leaves == "all-swapped":
        assert len(moved) == len(versions)
    elif leaves == "directory-rewrapped":  # every DEK re-wrapped in the registry, not one lake byte written
        assert home.registry().deks_by_version() == {2: DEKS}
        assert moved == [] and data_files_state(lake.uri) == data_before and temp_files(lake.uri) == []
    else:  # crashed before touching the file it was on: only the files before it moved
        assert len(moved) == skip and temp_files(lake.uri) == []

    # readers: the same files, layout and non-sensitive data; every row decrypts exactly once
    assert set(versions) == set(versions_before)
    assert hive_view(lake.uri).equals(hive_before)
    assert plain_equal(home, lake.uri, source)

    # running again finishes the job and cleans up
    report = reencrypt.run(lake.uri, home=home.path, mode=mode)
    assert report["complete"] and report["problems"] == []
    if mode == "rewrap":  # the lake keeps its birth versions and bytes; the directory makes it current
        assert file_versions(lake.uri) == versions_before and data_files_state(lake.uri) == data_before
        assert report["files_rewritten"] == 0
    else:
        assert all(v == {2: 40} for v in file_versions(lake.uri).values())
    assert _status(home, lake)["percent_current"] == 100.0
    assert temp_files(lake.uri) == []
    assert plain_equal(home, lake.uri, source)
    for kind in ("audit", "quarantine", "mismatch"):
        directory = lake.keyturn_path(kind)
        if os.path.isdir(directory):
            assert not [n for n in os.listdir(directory) if ".part-" in n or n.startswith(".")]
    if leaves == "part":  # the crashed run's audit parts were merged, not lost
        crashed = [a for a in read_side_outputs(lake, "audit") if a["event_id"]]
        assert len(crashed) == len(versions)
    again = reencrypt.run(lake.uri, home=home.path, mode=mode)
    assert again["files_rewritten"] == 0 and again["kms_calls"] == 0
    if mode == "rewrap":
        assert again["directory_rewrap"]["kms_calls"] == 0 and again["directory_rewrap"]["deks_moved"] == 0


@pytest.mark.parametrize("point,skip,command", DIRECTORY_CASES, ids=[f"{c[0]}-{c[2]}-skip{c[1]}" for c in DIRECTORY_CASES])
def test_sigkill_in_the_middle_of_a_directory_rewrap_loses_nothing(setup, point, skip, command):
    home, lake, source = setup
    hive_before = hive_view(lake.uri)
    versions_before = file_versions(lake.uri)
    lake_before = snapshot(lake.uri)  # every file, hidden ones too: bytes and mtime
    data_before = data_files_state(lake.uri)

    pre = run_cli("--home", home.path, "--json", "rewrap", "--max-deks", str(PRE_MOVED))
    assert pre.code == 0 and pre.json()["deks_moved"] == PRE_MOVED, pre.err
    if command == "rewrap":
        cmd = cli_command("--home", home.path, "rewrap")
    else:
        cmd = cli_command("--home", home.path, "reencrypt", "--lake", lake.uri, "--mode", "rewrap")
    proc = _crash(cmd, point, skip)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # the KMS re-wrapped `skip` more entries, but the SQLite directory swaps a batch in one transaction and
    # the crash came before it: each of them kept its old (still readable) wrapping
    assert home.registry().deks_by_version() == {1: DEKS - PRE_MOVED, 2: PRE_MOVED}
    assert snapshot(lake.uri) == lake_before  # not one lake byte, not one mtime
    assert hive_view(lake.uri).equals(hive_before)
    assert plain_equal(home, lake.uri, source)  # every row still decrypts to the source, moved DEK or not
    mid = _status(home, lake)
    assert mid["problems"] == [] and mid["rows"] == ROWS
    assert mid["status_rows"]["current"] + mid["status_rows"]["stale"] == ROWS
    assert 0 < mid["percent_current"] < 100

    # a rerun finishes the job: only the entries still under version 1 are re-wrapped, one KMS call each
    rerun = run_cli("--home", home.path, "--json", "rewrap")
    assert rerun.code == 0, rerun.err
    r = rerun.json()
    left = DEKS - PRE_MOVED
    assert (r["deks_moved"], r["kms_calls"], r["deks_failed"], r["complete"]) == (left, left, [], True)
    assert home.registry().deks_by_version() == {2: DEKS}

    # 100% current by the directory, while each file still carries its birth version and its bytes
    after = _status(home, lake)
    assert after["percent_current"] == 100.0 and after["status_rows"]["current"] == ROWS and after["problems"] == []
    assert file_versions(lake.uri) == versions_before
    assert data_files_state(lake.uri) == data_before
    if command == "rewrap":
        assert snapshot(lake.uri) == lake_before
    assert plain_equal(home, lake.uri, source)
    assert verify_chain(home.config.audit.path) >= 1

    again = run_cli("--home", home.path, "--json", "rewrap").json()
    assert (again["deks_moved"], again["kms_calls"], again["complete"]) == (0, 0, True)


# The CLI's rewrap in a child whose SQLite registry commits 2 swaps per transaction instead of 256, so a
# crash can come after committed batches with this small lake's DEKS entries.
_SMALL_BATCHES = (
    "import sys\n"
    "from keyturn.registry.sqlite import SqliteKeyRegistry\n"
    "SqliteKeyRegistry.swap_batch = 2\n"
    "from keyturn.pipelines.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_sigkill_after_committed_batches_keeps_them_and_the_rerun_redoes_only_the_batch_in_flight(setup):
    home, lake, source = setup
    lake_before = snapshot(lake.uri)
    env = {**os.environ, "KEYTURN_CRASHPOINT": "rewrap:before-swap", "KEYTURN_CRASHPOINT_SKIP": "4"}
    proc = subprocess.run([sys.executable, "-c", _SMALL_BATCHES, "--home", home.path, "rewrap"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # 5 ReEncrypts made: two batches of 2 committed, the fifth entry's batch in flight and lost
    assert home.registry().deks_by_version() == {1: DEKS - 4, 2: 4}
    assert snapshot(lake.uri) == lake_before
    assert plain_equal(home, lake.uri, source)
    rerun = run_cli("--home", home.path, "--json", "rewrap")
    assert rerun.code == 0, rerun.err
    r = rerun.json()
    assert (r["deks_moved"], r["kms_calls"], r["complete"]) == (DEKS - 4, DEKS - 4, True)
    assert home.registry().deks_by_version() == {2: DEKS}
    assert plain_equal(home, lake.uri, source)
