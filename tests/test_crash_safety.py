"""Crash safety: SIGKILL the reencrypt job at every crashpoint, then check nothing was lost.

Each case runs ``python -m pipelines.reencrypt`` in a subprocess with
``KEYTURN_CRASHPOINT`` set (see `keyturn.crash`), checks the process
died by SIGKILL, and then checks the lake as any reader would find it:
readable by pyarrow.dataset with the same non-sensitive data and layout,
and every source row decrypting exactly once with its original values. A
second run without a crashpoint must finish the job and leave no temp or
part files behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from keyturn.crash import CRASHPOINTS
from keyturn.lake.sideoutputs import read_side_outputs
from lake_support import build_lake, file_versions, hive_view, make_home, plain_equal, rotate, source_table, temp_files
from pipelines import reencrypt

pytestmark = pytest.mark.beam

ROOT = Path(__file__).resolve().parent.parent

# (crashpoint, hits to let pass first, mode, what the crash must leave behind)
CASES = [
    ("run:after-lock", 0, "reencrypt", None),
    ("run:after-inventory", 0, "reencrypt", None),
    ("rewrite:before-write", 1, "reencrypt", None),
    ("rewrite:mid-write", 1, "reencrypt", "temp"),
    ("rewrite:mid-write", 0, "rewrap", "temp"),
    ("rewrite:before-swap", 1, "reencrypt", "temp"),
    ("rewrite:after-swap", 1, "reencrypt", "swapped"),
    ("rewrite:after-side-outputs", 1, "reencrypt", "part"),
    ("run:before-report", 0, "rewrap", "all-swapped"),
]


def test_every_crashpoint_is_exercised():
    assert {c[0] for c in CASES} == set(CRASHPOINTS)


@pytest.fixture
def setup(tmp_path):
    home = make_home(str(tmp_path / "home"))
    source = source_table(240, 3)
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=2, row_group_size=15)
    rotate(home)
    return home, lake, source


def _run_crashing(lake, home, point, skip, mode):
    env = {**os.environ, "KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": str(skip)}
    cmd = [sys.executable, "-m", "pipelines.reencrypt", "--lake", lake.uri, "--home", home.path, "--mode", mode, "--workers", "1"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc


@pytest.mark.parametrize("point,skip,mode,leaves", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_sigkill_at_crashpoint_loses_nothing(setup, point, skip, mode, leaves):
    home, lake, source = setup
    hive_before = hive_view(lake.uri)
    versions_before = file_versions(lake.uri)

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
    else:  # crashed before touching the file it was on: only the files before it moved
        assert len(moved) == skip and temp_files(lake.uri) == []

    # readers: the same files, layout and non-sensitive data; every row decrypts exactly once
    assert set(versions) == set(versions_before)
    assert hive_view(lake.uri).equals(hive_before)
    assert plain_equal(home, lake.uri, source)

    # running again finishes the job and cleans up
    report = reencrypt.run(lake.uri, home=home.path, mode=mode)
    assert report["complete"] and report["problems"] == []
    assert all(v == {2: 40} for v in file_versions(lake.uri).values())
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
