"""The `keyturn` CLI: verbs, options, one-line errors, exit codes, JSON output, and the end-to-end session."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cli_support import customers, run_cli, snapshot, write_encrypted_file
from keyturn import errors, reports
from keyturn.audit.chain import verify_chain
from keyturn.registry.base import KeyState
from keyturn.pipelines import cli, exitcodes, output
from keyturn.home import KeyHome

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at(moment: datetime) -> dict[str, str]:
    return {"KEYTURN_NOW": moment.isoformat()}


@pytest.fixture
def home_dir(tmp_path) -> str:
    path = str(tmp_path / "home")
    result = run_cli("--home", path, "init", "--dataset", "customers", env=at(T0))
    assert result.code == 0, result.err
    return path


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    assert result.err.count("\n") == 1, result.err
    assert result.err.startswith("keyturn: error: ")
    assert "Traceback" not in result.err
    for word in words:
        assert word in result.err


# --------------------------------------------------------------------------- init and options


def test_init_then_refuses_second_init(home_dir):
    home = KeyHome.open(home_dir)
    assert home.dataset == "customers"
    assert home.registry().active().created_at == T0
    again = run_cli("--home", home_dir, "init")
    assert_one_line_error(again, exitcodes.USAGE, "already holds a key home")


def test_init_json_and_options_after_the_verb(tmp_path):
    result = run_cli("init", "--home", str(tmp_path / "h"), "--json", "--rotation-interval-days", "30")
    assert result.code == 0, result.err
    data = result.json()
    assert data["active_version"] == 1 and data["kek_id"] == "kek-0001" and data["rotation_interval_days"] == 30
    assert data["home"] == str(tmp_path / "h")


def test_home_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYTURN_HOME", str(tmp_path / "envhome"))
    assert run_cli("init").code == 0
    assert os.path.isfile(tmp_path / "envhome" / "config.yaml")
    monkeypatch.delenv("KEYTURN_HOME")
    monkeypatch.chdir(tmp_path)
    assert run_cli("init").code == 0
    assert os.path.isfile(tmp_path / ".keyturn" / "config.yaml")


def test_missing_home_is_one_clear_line(tmp_path):
    result = run_cli("--home", str(tmp_path / "nope"), "rotate")
    assert_one_line_error(result, exitcodes.USAGE, "no key home", "keyturn init")
    assert result.out == ""


def test_json_error_object(tmp_path):
    result = run_cli("--home", str(tmp_path / "nope"), "--json", "rotate")
    assert result.code == exitcodes.USAGE
    data = result.json()
    assert data["exit_code"] == exitcodes.USAGE and data["error_type"] == "HomeError" and "no key home" in data["error"]


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--home", str(tmp_path / "nope"), "--debug", "rotate")
    assert result.code == exitcodes.USAGE
    assert "Traceback" in result.err and result.err.rstrip().endswith("run `keyturn init` (or pass --home / set KEYTURN_HOME)")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["frobnicate"], "invalid choice"),
        (["rotate", "--nope"], "unrecognized arguments"),
        (["encrypt", "--lake", "x", "--columns", "a"], "--source"),
        (["encrypt", "--source", "s", "--lake", "x", "--columns", "a,,b"], "comma-separated"),
        (["encrypt", "--source", "s", "--lake", "x", "--columns", "a,a"], "named twice"),
        (["reencrypt", "--lake", "x", "--max-files", "0"], "must be >= 1"),
        (["reencrypt", "--lake", "x", "--mode", "shred"], "invalid choice"),
        (["retire", "one", "--lake", "x"], "whole number"),
        (["retire", "0"], "must be >= 1"),
        (["ingest", "--watch", "w", "--lake", "l", "--until-idle", "-1"], "positive"),
        ([], "required"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, words):
    assert_one_line_error(run_cli(*argv), exitcodes.USAGE, words)


def test_help_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("init", "encrypt", "rotate", "rewrap", "reencrypt", "decrypt", "status", "retire",
                 "schedule-deletion", "directory", "dataset", "audit", "ingest", "demo"):
        assert verb in out
    assert cli.main(["rotate", "--help"]) == 0
    rotate_help = capsys.readouterr().out
    assert "--if-due" in rotate_help and "--rewrap" in rotate_help


def test_beam_args_refused_for_verbs_without_a_pipeline(home_dir):
    result = run_cli("--home", home_dir, "rotate", "--", "--runner=DirectRunner")
    assert_one_line_error(result, exitcodes.USAGE, "Beam options")
    assert KeyHome.open(home_dir).registry().active().version == 1


def test_split_beam_args():
    assert cli.split_beam_args(["encrypt", "--lake", "l", "--", "--runner=X", "--", "y"]) == (
        ["encrypt", "--lake", "l"],
        ["--runner=X", "--", "y"],
    )
    assert cli.split_beam_args(["status"]) == (["status"], [])


# --------------------------------------------------------------------------- pipeline verbs (thin layer)


class FakeRun:
    """Stands in for a pipeline's run(): records its arguments, returns a canned report."""

    def __init__(self, report):
        self.report = report
        self.calls = []

    def __call__(self, *, home, beam_args, actor, clock, progress, **kwargs):
        self.calls.append(dict(home=home, beam_args=beam_args, progress=progress, actor=actor, clock=clock, **kwargs))
        if progress is not None:
            progress(reports.Progress("halfway", files_done=1, files_total=2, rows_done=10))
        return self.report


def test_encrypt_passes_arguments_and_beam_options(home_dir, monkeypatch):
    from keyturn.pipelines import encrypt

    fake = FakeRun(reports.EncryptReport(rows_written=5, files_written=1, lake="L", columns=["a", "b"]))
    monkeypatch.setattr(encrypt, "run", fake)
    result = run_cli("--home", home_dir, "encrypt", "--source", "S", "--lake", "L", "--columns", "a, b",
                     "--partition-by", "region", "--", "--runner=DirectRunner", "--direct_num_workers=2",
                     env=at(T0 + timedelta(days=1)))
    assert result.code == 0, result.err
    [call] = fake.calls
    assert call["home"] == home_dir
    assert (call["source"], call["lake"], call["columns"], call["partition_by"]) == ("S", "L", ["a", "b"], "region")
    assert call["beam_args"] == ["--runner=DirectRunner", "--direct_num_workers=2"]
    assert call["actor"].startswith("cli:")
    assert call["clock"]() == T0 + timedelta(days=1)  # the job gets the CLI's clock ($KEYTURN_NOW here)
    assert call["progress"] is None  # stderr is not a terminal here
    assert "Encrypted 5 rows into 1 files" in result.out


def test_progress_only_on_a_terminal_without_json(home_dir, monkeypatch):
    from keyturn.pipelines import decrypt

    fake = FakeRun(reports.DecryptReport(rows_written=1))
    monkeypatch.setattr(decrypt, "run", fake)
    monkeypatch.setattr(cli._Context, "show_progress", property(lambda self: not self.args.json))
    assert run_cli("--home", home_dir, "decrypt", "--lake", "L", "--out", "O").code == 0
    assert callable(fake.calls[-1]["progress"])
    assert run_cli("--home", home_dir, "--json", "decrypt", "--lake", "L", "--out", "O").code == 0
    assert fake.calls[-1]["progress"] is None


def test_progress_bars_show_files_rows_rate_and_time_left():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    with output.progress_display(True, "encrypting", console=console) as progress:
        progress(reports.Progress("encrypting", files_done=3, files_total=8, rows_done=30_000))
        progress(reports.Progress("committing"))
    text = console.file.getvalue()
    assert "encrypting" in text and "3/8 files" in text and "30,000 rows" in text
    assert re.search(r"\d[\d,]* rows/s", text)
    assert re.search(r"\d+:\d\d:\d\d|-:--:--", text)  # time left
    assert "committing" in text
    with output.progress_display(False, "encrypting", console=console) as progress:
        assert progress is None  # no terminal (or --json): no display at all


@pytest.mark.parametrize(
    "problems, code",
    [([], exitcodes.OK), ([{"path": "p", "reason": "corrupt", "detail": "bad"}], exitcodes.DATA)],
)
def test_pipeline_problems_exit_3(home_dir, monkeypatch, problems, code):
    from keyturn.pipelines import reencrypt

    report = reports.ReencryptReport(lake="L", dataset="d", mode="reencrypt", dry_run=True, problems=problems,
                                     temp_files=0)
    fake = FakeRun(report)
    monkeypatch.setattr(reencrypt, "run", fake)
    result = run_cli("--home", home_dir, "reencrypt", "--lake", "L", "--dry-run", "--max-files", "3")
    assert result.code == code
    assert (fake.calls[-1]["dry_run"], fake.calls[-1]["max_files"]) == (True, 3)
    assert result.out.startswith("lake L (dataset d)") and "dry run: would rewrite 0 files" in result.out
    assert ("problem: p: corrupt: bad" in result.out) == bool(problems)
    result = run_cli("--home", home_dir, "--json", "reencrypt", "--lake", "L")
    assert result.code == code and result.json() == report.to_json()
    assert result.json()["problems"] == problems and "inventory_before" not in result.json()


def test_pipeline_errors_map_to_exit_codes(home_dir, monkeypatch):
    from keyturn.pipelines import reencrypt

    def locked(**kwargs):
        raise errors.LakeLockedError("lake L is locked by another keyturn job (pid 1)")

    monkeypatch.setattr(reencrypt, "run", locked)
    assert_one_line_error(run_cli("--home", home_dir, "reencrypt", "--lake", "L"), exitcodes.REFUSED, "locked")

    def kms_down(**kwargs):
        raise errors.KmsUnavailableError("KMS unreachable")

    monkeypatch.setattr(reencrypt, "run", kms_down)
    assert_one_line_error(run_cli("--home", home_dir, "reencrypt", "--lake", "L"), exitcodes.UNAVAILABLE, "KMS")

    def bug(**kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(reencrypt, "run", bug)
    assert_one_line_error(
        run_cli("--home", home_dir, "reencrypt", "--lake", "L"), exitcodes.INTERNAL, "internal error", "--debug"
    )


def test_exit_code_table():
    e = errors
    assert exitcodes.exit_code_for(e.ConfigError("a.b", "bad")) == 2
    assert exitcodes.exit_code_for(e.HomeError("x")) == 2
    assert exitcodes.exit_code_for(e.UnknownVersionError("x")) == 2
    assert exitcodes.exit_code_for(e.InputError("x")) == 2
    assert exitcodes.exit_code_for(FileNotFoundError("x")) == 2
    assert exitcodes.exit_code_for(e.AuditChainError(3, "x")) == 3
    assert exitcodes.exit_code_for(e.DecryptionError()) == 3
    assert exitcodes.exit_code_for(e.KmsUnavailableError("x")) == 4
    assert exitcodes.exit_code_for(e.KeystoreError("x")) == 4
    assert exitcodes.exit_code_for(e.RegistryError("x")) == 4
    assert exitcodes.exit_code_for(e.VersionInUseError("x")) == 5
    assert exitcodes.exit_code_for(e.InvalidTransitionError("x")) == 5
    assert exitcodes.exit_code_for(e.LakeLockedError("x")) == 5
    assert exitcodes.exit_code_for(e.LakeError("x")) == 2
    assert exitcodes.exit_code_for(e.KmsClosedError("x")) == 1
    assert exitcodes.exit_code_for(RuntimeError("x")) == 1

    class Custom(Exception):
        exit_code = exitcodes.REFUSED

    assert exitcodes.exit_code_for(Custom()) == 5
    assert set(exitcodes.CODES) == {0, 1, 2, 3, 4, 5}


# --------------------------------------------------------------------------- rotate


def test_rotate_and_audit_trail(home_dir):
    result = run_cli("--home", home_dir, "--json", "rotate", "--reason", "quarterly", env=at(T0 + timedelta(days=3)))
    assert result.code == 0, result.err
    data = result.json()
    assert (data["rotated"], data["version_from"], data["version_to"], data["kek_id"]) == (True, 1, 2, "kek-0002")
    home = KeyHome.open(home_dir)
    assert [v.state for v in home.registry().versions()] == [KeyState.DECRYPT_ONLY, KeyState.ACTIVE]
    last = home.chain().entries()[-1].event
    assert (last.action.value, last.version_from, last.version_to, last.reason) == ("rotate", 1, 2, "quarterly")
    assert last.actor.startswith("cli:") and last.at.startswith("2025-01-04T12:00")
    text = run_cli("--home", home_dir, "rotate")
    assert "key version 3 (KEK kek-0003) is now active" in text.out


def test_rotate_if_due(home_dir):
    early = run_cli("--home", home_dir, "--json", "rotate", "--if-due", env=at(T0 + timedelta(days=89)))
    assert early.code == 0, early.err
    data = early.json()
    assert (data["rotated"], data["due"], data["active_version"]) == (False, False, 1)
    assert data["next_due"] == (T0 + timedelta(days=90)).isoformat()
    text = run_cli("--home", home_dir, "rotate", "--if-due", env=at(T0 + timedelta(days=89)))
    assert text.code == 0 and "not due" in text.out and "2025-04-01" in text.out
    assert KeyHome.open(home_dir).registry().active().version == 1

    due = run_cli("--home", home_dir, "--json", "rotate", "--if-due", env=at(T0 + timedelta(days=90)))
    assert due.code == 0 and due.json()["version_to"] == 2
    # the new version restarts the clock
    again = run_cli("--home", home_dir, "--json", "rotate", "--if-due", env=at(T0 + timedelta(days=91)))
    assert again.json()["rotated"] is False
    assert again.json()["next_due"] == (T0 + timedelta(days=180)).isoformat()


def test_bad_keyturn_now(home_dir):
    assert_one_line_error(run_cli("--home", home_dir, "rotate", env={"KEYTURN_NOW": "soon"}), 2, "KEYTURN_NOW")


# --------------------------------------------------------------------------- retire and deletion


@pytest.fixture
def rotated_home(home_dir, tmp_path):
    """v1 data in lake 'old', v2 data in lake 'new', v2 active; the DEK directory holds one DEK under each."""
    home = KeyHome.open(home_dir)
    write_encrypted_file(home, str(tmp_path / "old"), "region=0", customers(10))
    assert run_cli("--home", home_dir, "rotate").code == 0
    write_encrypted_file(KeyHome.open(home_dir), str(tmp_path / "new"), "region=0", customers(10))
    return home_dir


def write_unregistered_file(home: KeyHome, lake_dir: str, partition: str, rows: int, version: int) -> str:
    """A lake file encrypted under `version` whose DEK was never registered in the home's directory."""
    from keyturn.arrow_codec import encrypt_batch
    from keyturn.lake import Lake, footer_for, write_parquet_atomically
    from keyturn.lake.footer import dek_counts
    from keyturn.scope import DekScope, KekRef, Location

    kek = KekRef(version, home.registry().get(version).kek_id)
    with home.kms() as kms, DekScope(kms, kek, Location(home.dataset, partition)) as scope:  # no directory=
        sealed = encrypt_batch(customers(rows), ["email"], scope)
    lake = Lake(lake_dir)
    path = lake.path(partition, "part-unregistered.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    footer = footer_for(home.dataset, partition, {version: rows}, rows, ["email"], dek_counts(sealed))
    write_parquet_atomically(lake, path, pa.Table.from_batches([sealed]), footer)
    return path


def test_retire_refused_while_the_directory_holds_a_dek_under_the_version(rotated_home, tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    before = snapshot(old)
    # whatever --lake says (the v2-only lake, both lakes, or none), the directory decides
    for lakes in (["--lake", new], ["--lake", new, "--lake", old], []):
        result = run_cli("--home", rotated_home, "retire", "1", *lakes)
        assert_one_line_error(result, exitcodes.REFUSED, "cannot retire version 1",
                              "the DEK directory holds 1 DEK(s) wrapped under it", "keyturn rewrap")
    home = KeyHome.open(rotated_home)
    assert home.registry().get(1).state is KeyState.DECRYPT_ONLY
    assert [e.event.action.value for e in home.chain().entries()] == ["rotate", "rotate"]
    assert snapshot(old) == before


def test_retire_without_lake_after_rewrap(rotated_home, tmp_path):
    old = str(tmp_path / "old")
    before = snapshot(old)
    rewrap = run_cli("--home", rotated_home, "--json", "rewrap")
    assert rewrap.code == 0, rewrap.err
    r = rewrap.json()
    assert (r["deks_moved"], r["kms_calls"], r["complete"], r["lake_bytes_written"]) == (1, 1, True, 0)
    assert snapshot(old) == before  # rewrap changes no lake byte, not even an mtime
    result = run_cli("--home", rotated_home, "--json", "retire", "1")
    assert result.code == 0, result.err
    assert result.json()["state"] == "retired" and result.json()["lakes"] == []
    home = KeyHome.open(rotated_home)
    assert home.registry().get(1).state is KeyState.RETIRED
    assert [e.event.action.value for e in home.chain().entries()] == ["rotate", "rotate", "rewrap", "retire"]
    # the v1-born rows stay readable: their DEK is wrapped under version 2 now
    status = run_cli("--home", rotated_home, "--json", "status", "--lake", old)
    assert status.code == 0, status.err
    assert status.json()["status_rows"]["current"] == 10 and status.json()["percent_current"] == 100.0


def test_rotate_rewrap_moves_every_dek_and_no_lake_byte(rotated_home, tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    before = {lake: snapshot(lake) for lake in (old, new)}
    shown = run_cli("--home", rotated_home, "--json", "directory", "show")
    assert shown.code == 0, shown.err
    assert shown.json()["deks_by_version"] == {"1": 1, "2": 1}
    result = run_cli("--home", rotated_home, "--json", "rotate", "--rewrap", "--reason", "rotate and rewrap")
    assert result.code == 0, result.err
    data = result.json()
    assert (data["version_from"], data["version_to"]) == (2, 3)
    rw = data["rewrap"]
    assert (rw["active_version"], rw["from_versions"], rw["deks_moved"], rw["kms_calls"]) == (3, [1, 2], 2, 2)
    assert rw["complete"] is True and rw["lake_bytes_written"] == 0 and rw["remaining"] == {"1": 0, "2": 0}
    assert {lake: snapshot(lake) for lake in (old, new)} == before
    assert run_cli("--home", rotated_home, "--json", "directory", "show").json()["deks_by_version"] == {"3": 2}
    text = run_cli("--home", rotated_home, "rewrap")
    assert text.code == 0 and "Re-wrapped 0 DEK(s)" in text.out and "0 lake bytes written" in text.out
    for lake in (old, new):
        status = run_cli("--home", rotated_home, "--json", "status", "--lake", lake).json()
        assert status["percent_current"] == 100.0 and status["versions"]["3"]["rows"] == 10
    for version in ("1", "2"):
        retired = run_cli("--home", rotated_home, "--json", "retire", version, "--lake", old, "--lake", new)
        assert retired.code == 0, retired.err
    home = KeyHome.open(rotated_home)
    assert [v.state for v in home.registry().versions()] == [KeyState.RETIRED, KeyState.RETIRED, KeyState.ACTIVE]
    assert [e.event.action.value for e in home.chain().entries()] == ["rotate", "rotate", "rotate", "rewrap", "retire", "retire"]


def test_retire_refused_while_a_lake_holds_rows_the_directory_does_not_know(rotated_home, tmp_path):
    new = str(tmp_path / "new")
    assert run_cli("--home", rotated_home, "rewrap").code == 0
    write_unregistered_file(KeyHome.open(rotated_home), new, "region=1", 7, version=1)
    result = run_cli("--home", rotated_home, "retire", "1", "--lake", new)
    assert_one_line_error(result, exitcodes.REFUSED, "cannot retire version 1", "the inventory still finds 7 reference(s)")
    assert KeyHome.open(rotated_home).registry().get(1).state is KeyState.DECRYPT_ONLY


def test_retire_and_schedule_deletion(rotated_home, tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    early = run_cli("--home", rotated_home, "schedule-deletion", "1", "--lake", new)
    assert_one_line_error(early, exitcodes.REFUSED, "decrypt_only")
    assert run_cli("--home", rotated_home, "rewrap").code == 0
    result = run_cli("--home", rotated_home, "--json", "retire", "1", "--lake", new, "--lake", old,
                     "--reason", "all moved", env=at(T0 + timedelta(days=200)))
    assert result.code == 0, result.err
    assert result.json()["state"] == "retired" and result.json()["lakes"] == [new, old]
    result = run_cli("--home", rotated_home, "--json", "schedule-deletion", "1", "--lake", new, "--days", "7",
                     env=at(T0 + timedelta(days=200)))
    assert result.code == 0, result.err
    data = result.json()
    assert data["state"] == "pending_deletion" and data["pending_days"] == 7
    assert data["delete_after"] == (T0 + timedelta(days=207)).isoformat()
    events = [e.event for e in KeyHome.open(rotated_home).chain().entries()]
    assert [e.action.value for e in events] == ["rotate", "rotate", "rewrap", "retire", "schedule_deletion"]
    assert events[3].reason == "all moved" and events[3].version_from == 1


def test_schedule_deletion_refused_while_the_directory_holds_a_dek(rotated_home, tmp_path):
    """A version retired behind the registry's back while a DEK is still under it cannot be scheduled for deletion."""
    import sqlite3

    home = KeyHome.open(rotated_home)
    stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with sqlite3.connect(home.registry().path) as conn:
        conn.execute("UPDATE versions SET state = 'retired', state_changed_at = ? WHERE version = 1", (stamp,))
        conn.execute(
            "INSERT INTO history (version, from_state, to_state, at, actor, reason) "
            "VALUES (1, 'decrypt_only', 'retired', ?, 'intruder', 'out of band')",
            (stamp,),
        )
    result = run_cli("--home", rotated_home, "schedule-deletion", "1")
    assert_one_line_error(result, exitcodes.REFUSED, "cannot schedule_deletion version 1",
                          "the DEK directory holds 1 DEK(s)")
    assert KeyHome.open(rotated_home).registry().get(1).state is KeyState.RETIRED


def test_retire_unknown_or_active_version(rotated_home, tmp_path):
    new = str(tmp_path / "new")
    assert_one_line_error(run_cli("--home", rotated_home, "retire", "7", "--lake", new), exitcodes.USAGE, "no key version 7")
    assert_one_line_error(run_cli("--home", rotated_home, "retire", "2", "--lake", new), exitcodes.REFUSED, "active")


def test_retire_counts_unreadable_files_as_references(rotated_home, tmp_path):
    new = str(tmp_path / "new")
    assert run_cli("--home", rotated_home, "rewrap").code == 0  # the directory no longer blocks: the lake does
    with open(os.path.join(new, "region=0", "part-broken.parquet"), "wb") as f:
        f.write(b"not parquet")
    result = run_cli("--home", rotated_home, "retire", "1", "--lake", new)
    assert_one_line_error(result, exitcodes.REFUSED, "the inventory still finds 1 reference(s)")
    assert os.path.exists(os.path.join(new, "region=0", "part-broken.parquet"))
    assert KeyHome.open(rotated_home).registry().get(1).state is KeyState.DECRYPT_ONLY


def test_retire_missing_lake_is_refused(rotated_home, tmp_path):
    result = run_cli("--home", rotated_home, "retire", "1", "--lake", str(tmp_path / "typo"))
    assert_one_line_error(result, exitcodes.USAGE, "no lake at")
    assert KeyHome.open(rotated_home).registry().get(1).state is KeyState.DECRYPT_ONLY


# --------------------------------------------------------------------------- audit verify


def test_audit_verify_ok_and_broken(home_dir):
    run_cli("--home", home_dir, "rotate")
    ok = run_cli("--home", home_dir, "--json", "audit", "verify")
    assert ok.code == 0 and ok.json()["entries"] == 2 and ok.json()["ok"] is True
    log = os.path.join(home_dir, "audit.log")
    lines = open(log).read().splitlines()
    entry = json.loads(lines[1])
    entry["event"]["reason"] = "nothing to see here"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    with open(log, "w") as f:
        f.write("\n".join(lines) + "\n")
    broken = run_cli("--home", home_dir, "audit", "verify")
    assert_one_line_error(broken, exitcodes.DATA, "entry 1")
    as_json = run_cli("--home", home_dir, "--json", "audit", "verify")
    assert as_json.code == exitcodes.DATA and as_json.json()["index"] == 1


def test_audit_verify_works_without_keys(home_dir):
    os.remove(os.path.join(home_dir, "keystore.json"))
    assert run_cli("--home", home_dir, "audit", "verify").code == 0
    assert_one_line_error(run_cli("--home", home_dir, "rotate"), exitcodes.USAGE, "keystore")


# --------------------------------------------------------------------------- real processes


def test_subprocess_module_and_console_script(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    home = str(tmp_path / "h")
    proc = subprocess.run([sys.executable, "-m", "keyturn.pipelines.cli", "--home", home, "--json", "init"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["active_version"] == 1
    script = os.path.join(os.path.dirname(sys.executable), "keyturn")
    if not os.path.exists(script):
        pytest.skip("the keyturn console script is not installed in this environment")
    proc = subprocess.run([script, "--home", home, "rotate", "--nope"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("keyturn: error:")
    proc = subprocess.run([script, "--home", home, "audit", "verify"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "1 entries" in proc.stdout and proc.stderr == ""


# --------------------------------------------------------------------------- end to end


def _source(tmp_path) -> tuple[str, pa.Table]:
    n = 6000
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "region": pa.array([i % 6 for i in range(n)], pa.int64()),
            "email": [f"user{i}@example.com" for i in range(n)],
            "ssn": [None if i % 17 == 0 else f"{i % 900 + 100:03d}-{i % 90 + 10:02d}-{i % 9000 + 1000:04d}" for i in range(n)],
            "spend": [i * 0.5 for i in range(n)],
        }
    )
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(table.slice(0, 3500), src / "a.parquet")
    pq.write_table(table.slice(3500), src / "b.parquet")
    return str(src), table


def test_end_to_end_session(tmp_path):
    """init, encrypt, rotate, status, reencrypt, status, decrypt == source; other readers see the same layout."""
    home = str(tmp_path / "home")
    lake = str(tmp_path / "lake")
    src, table = _source(tmp_path)
    k = lambda *a: run_cli("--home", home, "--json", *a)  # noqa: E731

    assert k("init", "--dataset", "customers").code == 0
    enc = k("encrypt", "--source", src, "--lake", lake, "--columns", "email,ssn", "--partition-by", "region")
    assert enc.code == 0, enc.err
    assert enc.json()["rows_written"] == 6000

    plain_view = ds.dataset(lake, format="parquet", partitioning="hive").to_table()
    assert plain_view.num_rows == 6000
    assert plain_view.schema.field("email").type == pa.binary()  # ciphertext to other readers
    layout_before = sorted(os.listdir(lake))
    non_sensitive_before = plain_view.select(["id", "spend", "region"]).sort_by("id")

    assert k("rotate", "--reason", "e2e").json()["version_to"] == 2
    # read after rotation: the old records still decrypt before anything is rewritten
    early = k("decrypt", "--lake", lake, "--out", str(tmp_path / "plain-v1"), "--columns", "ssn")
    assert early.code == 0, early.err
    early_back = ds.dataset(str(tmp_path / "plain-v1"), format="parquet", partitioning="hive").to_table()
    assert early_back.select(["id", "ssn"]).sort_by("id").equals(table.select(["id", "ssn"]).sort_by("id"))
    assert "email" not in early_back.column_names
    before = k("status", "--lake", lake, "--report", str(tmp_path / "before.html"))
    assert before.code == 0, before.err
    b = before.json()
    assert (b["percent_current"], b["status_rows"]["stale"], b["partition_count"]) == (0.0, 6000, 6)

    dry = k("reencrypt", "--lake", lake, "--dry-run")
    assert dry.code == 0, dry.err
    assert k("status", "--lake", lake).json()["percent_current"] == 0.0

    re1 = k("reencrypt", "--lake", lake)
    assert re1.code == 0, re1.err
    after = k("status", "--lake", lake, "--report", str(tmp_path / "after.html")).json()
    assert (after["percent_current"], after["status_rows"]["stale"], after["rows"]) == (100.0, 0, 6000)
    assert after["versions"]["2"]["rows"] == 6000
    assert os.path.getsize(tmp_path / "after.html") > 0

    again = k("reencrypt", "--lake", lake)
    assert again.code == 0 and again.json()["kms_calls"] == 0 and again.json()["files_rewritten"] == 0

    out = str(tmp_path / "plain")
    dec = k("decrypt", "--lake", lake, "--out", out)
    assert dec.code == 0, dec.err
    back = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    cols = ["id", "email", "ssn", "spend"]
    assert back.select(cols).sort_by("id").equals(table.select(cols).sort_by("id"))
    assert sorted(back.column("region").to_pylist()) == sorted(table.column("region").to_pylist())

    view_after = ds.dataset(lake, format="parquet", partitioning="hive").to_table()
    assert sorted(os.listdir(lake)) == layout_before
    assert view_after.select(["id", "spend", "region"]).sort_by("id").equals(non_sensitive_before)
    assert verify_chain(os.path.join(home, "audit.log")) == 2


def test_bad_input_through_the_cli(tmp_path):
    """A missing column, a corrupt file and a file without key metadata: clear errors or problems, nothing deleted."""
    home = str(tmp_path / "home")
    lake = str(tmp_path / "lake")
    src, _ = _source(tmp_path)
    k = lambda *a: run_cli("--home", home, *a)  # noqa: E731
    assert k("init").code == 0

    result = k("encrypt", "--source", src, "--lake", lake, "--columns", "email,nope", "--partition-by", "region")
    assert_one_line_error(result, exitcodes.USAGE, "nope")
    assert not os.path.exists(lake) or not [n for n in os.listdir(lake) if not n.startswith(("_", "."))]

    assert k("encrypt", "--source", src, "--lake", lake, "--columns", "email", "--partition-by", "region").code == 0
    corrupt = os.path.join(lake, "region=1", "part-corrupt.parquet")
    with open(corrupt, "wb") as f:
        f.write(b"PAR1" + b"\x00" * 64)
    unversioned = os.path.join(lake, "region=2", "part-legacy.parquet")
    pq.write_table(pa.table({"id": [1, 2, 3], "email": ["a", "b", "c"]}), unversioned)
    assert k("rotate").code == 0

    result = run_cli("--home", home, "--json", "reencrypt", "--lake", lake)
    assert result.code == exitcodes.DATA, result.err
    reasons = {(p["path"], p["reason"]) for p in result.json()["problems"]}
    assert ("region=1/part-corrupt.parquet", "unreadable") in reasons
    assert ("region=2/part-legacy.parquet", "missing") in reasons
    assert os.path.exists(corrupt) and os.path.exists(unversioned)

    status = run_cli("--home", home, "--json", "status", "--lake", lake)
    assert status.code == exitcodes.DATA
    data = status.json()
    assert data["status_rows"]["stale"] == 0 and data["status_rows"]["missing"] == 3
    assert data["status_files"]["unreadable"] == 1
    assert os.path.exists(corrupt) and os.path.exists(unversioned)


def test_interrupt_exits_130(home_dir, monkeypatch):
    from keyturn.pipelines import decrypt

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(decrypt, "run", interrupted)
    result = run_cli("--home", home_dir, "decrypt", "--lake", "L", "--out", "O")
    assert result.code == exitcodes.INTERRUPTED == 130
    assert result.err == "keyturn: error: interrupted\n"


def test_rotate_refused_on_a_damaged_audit_log(home_dir):
    log = os.path.join(home_dir, "audit.log")
    with open(log, "rb") as f:
        data = f.read()
    with open(log, "wb") as f:
        f.write(data.replace(b"keyturn init", b"keyturn edit", 1))
    result = run_cli("--home", home_dir, "rotate")
    assert_one_line_error(result, exitcodes.DATA, "entry 0")
    assert KeyHome.open(home_dir).registry().active().version == 1


def test_ingest_until_idle_through_the_cli(tmp_path):
    home = str(tmp_path / "home")
    watch = tmp_path / "watch"
    watch.mkdir()
    lake = str(tmp_path / "lake")
    assert run_cli("--home", home, "init").code == 0
    pq.write_table(pa.table({"id": [1, 2, 3], "region": [0, 1, 0], "email": ["a@x", "b@x", "c@x"]}), watch / "one.parquet")
    result = run_cli("--home", home, "--json", "ingest", "--watch", str(watch), "--lake", lake, "--columns", "email",
                     "--partition-by", "region", "--until-idle", "0.5", "--poll-interval", "0.1")
    assert result.code == 0, result.err
    assert result.json()["rows_written"] == 3
    view = ds.dataset(lake, format="parquet", partitioning="hive").to_table()
    assert sorted(view.column("id").to_pylist()) == [1, 2, 3]
    assert view.schema.field("email").type == pa.binary()


def test_demo_verb(tmp_path):
    result = run_cli("demo", "--rows", "3000", "--partitions", "3", "--out", str(tmp_path / "demo"))
    assert result.code == 0, result.err
    assert "identical to the source" in result.out
    data = run_cli("--json", "demo", "--rows", "3000", "--partitions", "3", "--out", str(tmp_path / "demo")).json()
    assert data["problems"] == []
