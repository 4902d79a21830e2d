"""Issue 10, items 9, 10, 15 and 16: stale lake locks, odd rows in a rewrite, the ingest ledger, the audit anchor.

- 9: a local lake lock whose holder process is gone (exited, SIGKILLed,
  pid reused, host rebooted) is taken over with a note; a live holder still
  refuses (exit 5).
- 10: one row without a key version, without a DEK, or with a corrupt
  envelope or cells stays byte for byte while the file's other rows move
  onto fresh DEKs; the file is reported, and a second run does not rewrite
  it again for rows that can never move.
- 15: the ingest ledger identifies sources by a keyed MAC whose key stays
  in the key home; no SHA-256 of a source reaches the lake; a re-landed
  identical file is still recognised; old ledgers with sha256 still work.
- 16: the audit log's head is anchored in the key registry, so deleting its
  tail (with ``audit.log.head``) or a middle entry fails `audit verify`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aws_support import client, moto_url, unique  # noqa: F401  (moto_url is a fixture)
from cli_support import run_cli
from lake_support import SENSITIVE, build_lake, lake_plaintext, make_home, rotate, source_table
from pipeline_support import customers

from keyturn.audit.chain import AuditChain
from keyturn.audit.events import build_event
from keyturn.errors import AuditChainError, ConcurrentModificationError, InputError, LakeLockedError
from keyturn.lake import Lake
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.lake.ledger import LEDGER_KEY_PARTITION
from keyturn.pipelines import exitcodes, ingest, reencrypt
from keyturn.home import KeyHome

REPO = str(Path(__file__).resolve().parents[1])


# =========================================================================== 9: stale lake locks


@pytest.fixture
def lake_dir(tmp_path) -> Lake:
    (tmp_path / "lake").mkdir()
    return Lake(str(tmp_path / "lake"))


def _python(code: str, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=stdout, text=True, env=env)


def _holders(lake: Lake) -> list[dict]:
    with open(lake.keyturn_path("lock")) as f:
        return json.loads(f.read())["holders"]


def test_a_lock_left_by_a_job_that_exited_is_taken_over_with_a_note(lake_dir, caplog):
    # The job exits without releasing, and a process it forked (as a Beam worker pool may)
    # outlives it: the lake must not stay locked in the name of the exited job.
    proc = _python(
        """
        import os, sys, time
        from keyturn.lake import Lake
        Lake(sys.argv[1]).lock(exclusive=True, owner="reencrypt finished-run").acquire()
        child = os.fork()
        if child == 0:              # a leftover child that inherited everything the job had open
            time.sleep(30)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)                  # no release: the job is simply gone
        """,
        lake_dir.uri,
    )
    child = int(proc.stdout.readline())
    proc.wait(timeout=30)
    try:
        with caplog.at_level(logging.WARNING, logger="keyturn.lake.lock"):
            lock = lake_dir.lock(exclusive=True, owner="reencrypt next-run").acquire()
        try:
            assert [h["pid"] for h in lock.taken_over] == [proc.pid]
            assert "took over the lock" in caplog.text and f"pid {proc.pid}" in caplog.text
            (mine,) = _holders(lake_dir)
            assert mine["owner"] == "reencrypt next-run" and mine["pid"] == os.getpid()
            assert "reencrypt finished-run" in mine["took_over"][0]
        finally:
            lock.release()
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert _holders(lake_dir) == []


def test_a_lock_of_a_sigkilled_job_is_taken_over_and_a_live_one_refuses(lake_dir):
    holder = _python(
        """
        import sys, time
        from keyturn.lake import Lake
        Lake(sys.argv[1]).lock(exclusive=True, owner="reencrypt live").acquire()
        print("locked", flush=True)
        time.sleep(60)
        """,
        lake_dir.uri,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LakeLockedError, match=f"reencrypt live, exclusive, pid {holder.pid} on"):
            lake_dir.lock(exclusive=False).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with lake_dir.lock(exclusive=True) as lock:
        assert [h["owner"] for h in lock.taken_over] == ["reencrypt live"]


def test_a_zombie_holder_is_gone(lake_dir):
    from keyturn.lake.lock import holder_state

    holder = _python(
        """
        import sys
        from keyturn.lake import Lake
        Lake(sys.argv[1]).lock(owner="zombie").acquire()
        print("locked", flush=True)
        """,
        lake_dir.uri,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        deadline = time.monotonic() + 30
        while holder_state(_holders(lake_dir)[0]) != "gone" and time.monotonic() < deadline:
            time.sleep(0.05)  # exited but not reaped yet: a zombie, not a live holder
        with lake_dir.lock() as lock:
            assert [h["owner"] for h in lock.taken_over] == ["zombie"]
    finally:
        holder.wait(timeout=30)


def _forge_holder(lake: Lake, **fields) -> dict:
    """Write a lock document with one holder like this process's, with `fields` changed."""
    lock = lake.lock(owner="forged").acquire()
    (me,) = _holders(lake)
    lock._token = None  # forget it without releasing: the entry stays, as a vanished job's would
    me.update(fields)
    with open(lake.keyturn_path("lock"), "w") as f:
        json.dump({"format": 1, "holders": [me]}, f)
    return me


def test_a_reused_pid_or_a_reboot_does_not_keep_the_lake_locked(lake_dir):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a live pid, but not the process that took the lock (it started at another time)
        _forge_holder(lake_dir, pid=sleeper.pid, start="1")
        with lake_dir.lock() as lock:
            assert [h["pid"] for h in lock.taken_over] == [sleeper.pid]
        # the same pid and start time, recorded in an earlier boot of this host
        _forge_holder(lake_dir, boot_id="00000000-0000-0000-0000-000000000000")
        with lake_dir.lock() as lock:
            assert [h["owner"] for h in lock.taken_over] == ["forged"]
        # this very process, alive: refused
        _forge_holder(lake_dir)
        with pytest.raises(LakeLockedError, match=f"forged, exclusive, pid {os.getpid()}"):
            lake_dir.lock().acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_holder_on_another_host_is_never_guessed_dead(lake_dir):
    _forge_holder(lake_dir, host="some-other-host", pid=1)
    with pytest.raises(LakeLockedError, match="some-other-host.*cannot tell whether it is still alive.*delete"):
        lake_dir.lock(exclusive=False).acquire()


def test_reencrypt_refuses_a_live_holder_with_exit_5_and_takes_over_a_dead_one(tmp_path):
    home = make_home(str(tmp_path / "home"))
    lake = build_lake(home, str(tmp_path / "lake"), source_table(40, 2), files_per_partition=1)
    rotate(home)
    holder = _python(
        """
        import sys, time
        from keyturn.lake import Lake
        Lake(sys.argv[1]).lock(exclusive=False, owner="ingest live").acquire()
        print("locked", flush=True)
        time.sleep(60)
        """,
        lake.uri,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_cli("--home", home.path, "reencrypt", "--lake", lake.uri)
        assert refused.code == exitcodes.REFUSED and f"ingest live, shared, pid {holder.pid}" in refused.err
        holder.kill()
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    done = run_cli("--home", home.path, "--json", "reencrypt", "--lake", lake.uri)
    assert done.code == exitcodes.OK, done.err
    assert done.json()["files_rewritten"] == 2 and _holders(lake) == []


# =========================================================================== 10: odd rows in a rewrite


@pytest.fixture
def one_file_lake(tmp_path):
    home = make_home(str(tmp_path / "home"))
    source = source_table(40, 1)
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=1, row_group_size=40)
    return home, lake, source


ODD = 5


def _spoil_row(lake: Lake, how: str) -> tuple[pa.Table, pa.Table]:
    """Damage row ODD of the lake's one file (`how`); returns (the whole file, the odd row) as stored."""
    (f,) = lake.data_files()
    table = pq.read_table(f.path)
    meta = pq.read_metadata(f.path).metadata
    column = {"no_version": "_keyturn_version", "no_dek": "_keyturn_dek", "bad_envelope": "_keyturn_dek",
              "bad_commitment": "_keyturn_dek", "bad_cell": "ssn"}[how]
    values = table.column(column).combine_chunks()
    plain_type = values.type.value_type if pa.types.is_dictionary(values.type) else values.type
    cells = values.cast(plain_type).to_pylist()
    if how in ("no_version", "no_dek"):
        cells[ODD] = None
    elif how == "bad_envelope":
        cells[ODD] = cells[ODD][:10]  # does not parse
    elif how == "bad_commitment":
        spoiled = bytearray(cells[ODD])
        spoiled[40] ^= 1  # parses, but commits to another key than the directory's entry
        cells[ODD] = bytes(spoiled)
    else:
        spoiled = bytearray(cells[ODD])
        spoiled[-1] ^= 1  # the cell fails to authenticate
        cells[ODD] = bytes(spoiled)
    new = pa.array(cells, plain_type)
    if pa.types.is_dictionary(values.type):
        new = new.dictionary_encode().cast(values.type)
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), new)
    pq.write_table(table.replace_schema_metadata(meta), f.path)
    stored = pq.read_table(f.path)
    return stored, stored.slice(ODD, 1)


@pytest.mark.beam
@pytest.mark.parametrize(
    "how, kept_as",
    [("no_version", "missing"), ("no_dek", "missing"), ("bad_envelope", "corrupt"),
     ("bad_commitment", "corrupt"), ("bad_cell", "corrupt")],
)
def test_one_odd_row_stays_and_the_others_move_onto_fresh_deks(one_file_lake, how, kept_as):
    home, lake, source = one_file_lake
    before, odd = _spoil_row(lake, how)
    old_envelopes = set(before.column("_keyturn_dek").to_pylist())
    active = rotate(home)

    report = reencrypt.run(lake.uri, home=home.path)
    (outcome,) = report["files"]
    assert outcome["result"] == "rewritten" and outcome["rows_moved"] == 39
    assert outcome["status_rows"][kept_as] == 1 and f"1 {kept_as}" in outcome["detail"]

    (f,) = lake.data_files()
    after = pq.read_table(f.path)
    assert after.num_rows == 40  # nothing lost
    assert after.slice(ODD, 1).to_pylist() == odd.to_pylist()  # the odd row, byte for byte
    others = [i for i in range(40) if i != ODD]
    moved = after.take(others)
    assert set(moved.column("_keyturn_version").to_pylist()) == {active}
    assert not set(moved.column("_keyturn_dek").to_pylist()) & old_envelopes  # fresh DEKs
    plain, statuses = lake_plaintext(home, lake.uri)
    assert statuses["current"] == 39 and statuses[kept_as] == 1
    want = source.drop_columns(["region"]).take(others).to_pylist()
    assert plain.drop_columns(["region"]).to_pylist() == sorted(want, key=lambda r: r["id"])

    # the odd row can never move: a second run leaves the file alone instead of re-encrypting it again
    stored = open(f.path, "rb").read()
    again = reencrypt.run(lake.uri, home=home.path)
    assert again["files_rewritten"] == 0 and again["rows_moved"] == 0
    assert open(f.path, "rb").read() == stored
    # ... and says so: the job is complete, and the file with the row that cannot move is a named problem
    assert again["complete"] is True
    reasons = {p["reason"] for p in again["problems"] if p["path"] == f.relpath}
    # (from footers alone an envelope that does not parse shows as a row without key metadata: "missing")
    assert reasons & {"unmovable_rows", "footer_disagrees", "missing", kept_as}, again["problems"]


# =========================================================================== 15: the ingest ledger


FAST = {"poll_interval": 0.05, "until_idle": 0.6}


@pytest.fixture
def ingest_home(tmp_path):
    return KeyHome.init(tmp_path / "home", dataset="customers")


def _land(directory: Path, name: str, table: pa.Table) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return directory / name


def _lake_bytes(lake: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(lake.rglob("*")) if p.is_file())


def _ledger(lake: Path) -> dict:
    return json.loads((lake / "_keyturn" / "ingested.json").read_text())["sources"]


@pytest.mark.beam
def test_the_ledger_holds_no_hash_of_any_source_and_a_relanded_file_is_skipped(ingest_home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    small = pa.table({"id": [1], "region": [0], "email": ["a@x"], "ssn": ["123-45-6789"]})  # guessable
    files = [_land(land, "one.parquet", small), _land(land, "two.parquet", customers(50))]
    first = ingest.run(home=ingest_home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    assert first["files_ingested"] == 2 and first["rows_written"] == 51

    everything = _lake_bytes(lake)
    for path in files:
        data = path.read_bytes()
        for digest in (hashlib.sha256(data).hexdigest(), hashlib.sha256(data).digest(), hashlib.md5(data).hexdigest()):
            assert (digest.encode() if isinstance(digest, str) else digest) not in everything
    entries = _ledger(lake)
    assert set(entries) == {"one.parquet", "two.parquet"}
    assert all("sha256" not in e and len(e["mac"]) == 64 for e in entries.values())
    # the MAC key is a DEK of the key home's directory; the lake holds its id only, never its wrapping
    (key_id,) = {e["mac_key"] for e in entries.values()}
    entry = ingest_home.registry().lookup_deks([bytes.fromhex(key_id)])[bytes.fromhex(key_id)]
    assert (entry.dataset, entry.partition) == ("customers", LEDGER_KEY_PARTITION)
    assert entry.envelope not in everything and entry.envelope[-32:] not in everything

    # touched, and deleted then landed again with the same bytes: both still done, with one KMS call
    os.utime(files[0], ns=(1, 1))
    data = files[1].read_bytes()
    files[1].unlink()
    time.sleep(0.01)
    files[1].write_bytes(data)
    again = ingest.run(home=ingest_home, watch=str(land), lake=str(lake), **FAST)
    assert again["files_ingested"] == 0 and again["rows_written"] == 0 and again["ledger_key_kms_calls"] == 1

    # the same size but other bytes is another file: ingested
    size = files[0].stat().st_size
    changed = small.set_column(3, "ssn", pa.array(["987-65-4321"]))
    _land(land, "one.parquet", changed)
    assert files[0].stat().st_size == size and files[0].read_bytes() != data
    third = ingest.run(home=ingest_home, watch=str(land), lake=str(lake), **FAST)
    assert third["files_ingested"] == 1 and third["rows_written"] == 1
    assert {e["mac_key"] for e in _ledger(lake).values()} == {key_id}  # one key for the lake


@pytest.mark.beam
def test_an_old_ledger_with_sha256_is_still_recognised_and_gets_no_new_hash(ingest_home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    old = _land(land, "old.parquet", customers(30))
    (lake / "_keyturn").mkdir(parents=True)
    stat = old.stat()
    legacy = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns - 5, "sha256": hashlib.sha256(old.read_bytes()).hexdigest(),
              "status": "ingested", "run_id": "old-run"}
    (lake / "_keyturn" / "ingested.json").write_text(json.dumps({"format": 1, "sources": {"old.parquet": legacy}}))
    _land(land, "new.parquet", customers(20, start=1000))

    report = ingest.run(home=ingest_home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    assert report["files_ingested"] == 1 and report["rows_written"] == 20  # old.parquet: touched, same bytes, done
    entries = _ledger(lake)
    assert entries["old.parquet"] == legacy  # read as it was, not re-hashed
    assert "sha256" not in entries["new.parquet"] and "mac" in entries["new.parquet"]


@pytest.mark.beam
def test_the_ledger_key_follows_rotation_rewrap_and_retire(ingest_home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    path = _land(land, "a.parquet", customers(20))
    ingest.run(home=ingest_home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    home = ingest_home.path
    assert run_cli("--home", home, "rotate").code == 0
    assert run_cli("--home", home, "retire", "1").code == exitcodes.REFUSED  # the ledger key is a DEK under version 1
    assert run_cli("--home", home, "rewrap").code == 0
    assert run_cli("--home", home, "retire", "1").code == 0
    os.utime(path, ns=(3, 3))
    again = ingest.run(home=ingest_home, watch=str(land), lake=str(lake), **FAST)
    assert again["files_ingested"] == 0 and again["ledger_key_kms_calls"] == 1  # unwrapped under version 2


@pytest.mark.beam
def test_a_ledger_naming_a_key_this_home_does_not_hold_is_refused(ingest_home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    path = _land(land, "a.parquet", customers(10))
    ingest.run(home=ingest_home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    other = KeyHome.init(tmp_path / "other", dataset="customers")
    os.utime(path, ns=(2, 2))  # needs the MAC to decide
    with pytest.raises(InputError, match="MAC key .* is not in the DEK directory of this key home"):
        ingest.run(home=other, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)


# =========================================================================== 16: the audit anchor


@pytest.fixture
def audited_home(tmp_path) -> str:
    home = str(tmp_path / "home")
    assert run_cli("--home", home, "init").code == 0
    for _ in range(3):
        assert run_cli("--home", home, "rotate").code == 0
    return home


def _log_lines(home: str) -> list[str]:
    return Path(home, "audit.log").read_text().splitlines(keepends=True)


def _write_log(home: str, lines: list[str]) -> None:
    Path(home, "audit.log").write_text("".join(lines))


def test_an_untouched_log_verifies_and_reaches_its_anchor(audited_home):
    result = run_cli("--home", audited_home, "--json", "audit", "verify")
    assert result.code == exitcodes.OK, result.err
    report = result.json()
    assert report["entries"] == 4 and report["anchor"]["seq"] == 3 and report["anchor"]["hash"] == report["head"]
    assert report["unanchored_entries"] == 0 and report["anchored_in"] == "the key registry"
    text = run_cli("--home", audited_home, "audit", "verify").out
    assert "4 entries" in text and "anchored in the key registry (seq 3)" in text


def test_deleting_the_last_entry_and_the_head_file_fails_verify(audited_home):
    _write_log(audited_home, _log_lines(audited_home)[:-1])
    os.remove(os.path.join(audited_home, "audit.log.head"))
    result = run_cli("--home", audited_home, "audit", "verify")
    assert result.code == exitcodes.DATA and result.err.count("\n") == 1
    assert "3 entries but the key registry's audit anchor records seq 3: trailing entries were deleted" in result.err
    # and no control-plane change goes on top of the truncated log
    before = KeyHome.open(audited_home).registry().active().version
    refused = run_cli("--home", audited_home, "rotate")
    assert refused.code == exitcodes.DATA and "trailing entries were deleted" in refused.err
    assert KeyHome.open(audited_home).registry().active().version == before


def test_deleting_the_whole_log_and_its_head_fails_verify(audited_home):
    _write_log(audited_home, [])
    os.remove(os.path.join(audited_home, "audit.log.head"))
    result = run_cli("--home", audited_home, "audit", "verify")
    assert result.code == exitcodes.DATA and "anchor" in result.err


def test_deleting_a_middle_entry_fails_verify(audited_home):
    lines = _log_lines(audited_home)
    _write_log(audited_home, lines[:1] + lines[2:])
    result = run_cli("--home", audited_home, "--json", "audit", "verify")
    assert result.code == exitcodes.DATA and result.json()["index"] == 1


def test_an_old_home_without_an_anchor_passes_and_says_so_until_its_next_change(audited_home):
    with sqlite3.connect(os.path.join(audited_home, "registry.sqlite")) as conn:  # a registry from before anchors
        conn.execute("DROP TABLE audit_anchor")
    result = run_cli("--home", audited_home, "--json", "audit", "verify")
    assert result.code == exitcodes.OK and result.json()["anchor"] is None and result.json()["entries"] == 4
    assert "holds no anchor for it yet" in run_cli("--home", audited_home, "audit", "verify").out
    # the next control-plane change anchors the log, after checking the whole of it
    assert run_cli("--home", audited_home, "rotate").code == 0
    assert run_cli("--home", audited_home, "--json", "audit", "verify").json()["anchor"]["seq"] == 4
    _write_log(audited_home, _log_lines(audited_home)[:-1])
    os.remove(os.path.join(audited_home, "audit.log.head"))
    assert run_cli("--home", audited_home, "audit", "verify").code == exitcodes.DATA


def test_every_control_plane_append_moves_the_anchor(audited_home, tmp_path):
    registry = KeyHome.open(audited_home).registry()
    assert registry.audit_anchor()[0] == 3
    assert run_cli("--home", audited_home, "rewrap").code == 0
    assert run_cli("--home", audited_home, "retire", "1").code == 0
    assert run_cli("--home", audited_home, "schedule-deletion", "1", "--days", "30").code == 0
    entries = KeyHome.open(audited_home).chain().entries()
    assert registry.audit_anchor() == (entries[-1].seq, entries[-1].hash)
    assert [e.event.action.value for e in entries][-2:] == ["retire", "schedule_deletion"]


def test_the_anchor_only_moves_forward(tmp_path):
    registry = SqliteKeyRegistry(tmp_path / "r.sqlite")
    h = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    assert registry.audit_anchor() is None
    registry.advance_audit_anchor(0, h[0], expected=None)
    registry.advance_audit_anchor(2, h[2], expected=(0, h[0]))
    with pytest.raises(ValueError, match="only moves forward"):
        registry.advance_audit_anchor(1, h[1], expected=(2, h[2]))
    with pytest.raises(ConcurrentModificationError):
        registry.advance_audit_anchor(3, h[1], expected=(0, h[0]))
    with pytest.raises(ConcurrentModificationError):
        registry.advance_audit_anchor(3, h[1], expected=None)
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        with pytest.raises(sqlite3.IntegrityError, match="only moves forward"):
            conn.execute("UPDATE audit_anchor SET seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            conn.execute("DELETE FROM audit_anchor")
    assert registry.audit_anchor() == (2, h[2])


def _event(n: int):
    return build_event("rotate", actor="t", reason="t", dataset="d", partition="", version_from=n, version_to=n + 1,
                       counts={}, scope_key=f"t:{n}")


def test_a_second_log_anchored_in_the_same_registry_is_refused_and_left_unchanged(tmp_path):
    registry = SqliteKeyRegistry(tmp_path / "r.sqlite")
    first = AuditChain(tmp_path / "a.log", anchor=registry)
    for n in range(1, 3):
        first.append(_event(n))
    second = AuditChain(tmp_path / "b.log", anchor=registry)  # a copied home writing its own log
    with pytest.raises(AuditChainError, match="anchor records entry 1"):
        second.append(_event(9))
    assert not (tmp_path / "b.log").read_bytes()
    assert first.verify().anchor == registry.audit_anchor() == first.head()


@pytest.mark.aws
def test_the_dynamodb_registry_anchors_the_chain_the_same_way(moto_url, tmp_path):
    from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table

    table = unique("keyturn-anchor")
    create_table(table, client=client("dynamodb", moto_url))
    registry = DynamoDbKeyRegistry(table, client=client("dynamodb", moto_url))
    chain = AuditChain(tmp_path / "audit.log", anchor=registry)
    assert registry.audit_anchor() is None
    for n in range(1, 4):
        chain.append(_event(n))
    assert registry.audit_anchor() == chain.head() and chain.head()[0] == 2
    with pytest.raises(ValueError, match="only moves forward"):
        registry.advance_audit_anchor(1, "0" * 64, expected=chain.head())
    with pytest.raises(ConcurrentModificationError):
        registry.advance_audit_anchor(5, "0" * 64, expected=(1, "0" * 64))
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    (tmp_path / "audit.log").write_text("".join(lines[:-1]))
    os.remove(tmp_path / "audit.log.head")
    with pytest.raises(AuditChainError, match="trailing entries were deleted"):
        chain.verify()
