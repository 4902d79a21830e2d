"""keyturn.lake without Beam: layout, footers and summaries, atomic writes, inventory, lock, rewrite_file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.errors import LakeError, LakeLockedError, VersionInUseError
from keyturn.lake import (
    AtomicParquetWriter,
    Lake,
    footer_for,
    parse_footer,
    read_file_summary,
    take_inventory,
    write_parquet_atomically,
)
from keyturn.lake.rewrite import rewrite_file
from keyturn.lake.sideoutputs import compact_parts, part_name, read_side_outputs, write_side_output
from keyturn.scope import KekRef
from lake_support import (
    DATASET,
    SENSITIVE,
    build_lake,
    file_versions,
    lake_plaintext,
    make_home,
    plain_equal,
    rotate,
    source_table,
    write_encrypted_file,
)


@pytest.fixture
def home(tmp_path):
    return make_home(str(tmp_path / "home"))


@pytest.fixture
def source():
    return source_table(300, 3)


@pytest.fixture
def lake(home, tmp_path, source):
    return build_lake(home, str(tmp_path / "lake"), source, files_per_partition=2, row_group_size=40)


# -- footers ------------------------------------------------------------------------


def test_footer_round_trip_and_rejections():
    footer = footer_for("ds", "a=1/b=2", {1: 3, 2: 4}, 9, ["ssn"])
    assert parse_footer(footer.to_bytes()) == footer
    assert footer.missing_rows == 2
    doc = json.loads(footer.to_bytes())
    assert doc == {"format": 1, "dataset": "ds", "partition": "a=1/b=2", "rows": 9,
                   "versions": {"1": 3, "2": 4}, "encrypted_columns": ["ssn"]}
    for bad in (b"not json", b"[]", json.dumps({**doc, "format": 2}).encode(),
                json.dumps({**doc, "rows": 5}).encode(),  # more versioned rows than rows
                json.dumps({**doc, "versions": {"0": 1}}).encode(),
                json.dumps({**doc, "rows": -1}).encode(), json.dumps({**doc, "encrypted_columns": "ssn"}).encode(), None):
        assert parse_footer(bad) is None
    with pytest.raises(ValueError):
        footer_for("ds", "", {1: 5}, 4, [])


def test_write_atomically_leaves_no_temp_and_stamps_footer(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path = lake.new_data_path("region=1")
    table = pa.table({"id": [1, 2, 3]})
    write_parquet_atomically(lake, path, table, footer_for("ds", "region=1", {}, 3, []))
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    md = pq.read_metadata(path)
    assert parse_footer(md.metadata[b"keyturn"]).rows == 3
    assert pq.read_table(path).column("id").to_pylist() == [1, 2, 3]


def test_aborted_writer_keeps_the_original(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path = lake.new_data_path("")
    write_parquet_atomically(lake, path, pa.table({"id": [1]}), None)
    before = open(path, "rb").read()
    with pytest.raises(RuntimeError):
        with AtomicParquetWriter(lake, path, pa.schema([("id", pa.int64())])) as writer:
            writer.write(pa.table({"id": [7, 8]}))
            assert os.path.exists(writer.temp_path)
            raise RuntimeError("boom")
    assert open(path, "rb").read() == before
    assert lake.temp_files() == []


def test_layout_lists_data_and_skips_hidden(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    for rel in ("top.parquet", "a=1/b=2/x.parquet", "a=1/y.parquet"):
        write_parquet_atomically(lake, lake.path(rel), pa.table({"v": [1]}), None)
    for rel in ("_keyturn/audit/r.avro", "a=1/.keyturn-tmp-abc-x.parquet", "_SUCCESS", "a=1/_hidden/z.parquet", ".dot/q.parquet"):
        os.makedirs(os.path.dirname(lake.path(rel)), exist_ok=True)
        open(lake.path(rel), "wb").write(b"junk")
    files = lake.data_files()
    assert [(f.relpath, f.partition) for f in files] == [
        ("a=1/b=2/x.parquet", "a=1/b=2"), ("a=1/y.parquet", "a=1"), ("top.parquet", "")
    ]
    assert [os.path.basename(p) for p in lake.temp_files()] == [".keyturn-tmp-abc-x.parquet"]
    assert lake.remove_temp_files() == ["a=1/.keyturn-tmp-abc-x.parquet"]
    assert lake.temp_files() == []
    with pytest.raises(LakeError):
        Lake(str(tmp_path / "nope")).require()


# -- summaries and inventory --------------------------------------------------------


def test_summary_from_footer_reads_no_data(lake, home, monkeypatch):
    f = lake.data_files()[0]
    import keyturn.lake.footer as footer_mod

    def no_data(*a, **k):
        raise AssertionError("read data pages")

    monkeypatch.setattr(footer_mod.pq.ParquetFile, "read_row_group", no_data)
    s = read_file_summary(lake, f)
    assert (s.source, s.rows, s.versions, s.missing_rows) == ("footer", 50, {1: 50}, 0)
    assert s.encrypted_columns == SENSITIVE and s.dataset == DATASET


def _rewrite_without_footer(path, table=None, row_group_size=None):
    table = table if table is not None else pq.read_table(path)
    table = table.replace_schema_metadata({k: v for k, v in (table.schema.metadata or {}).items() if k != b"keyturn"})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_summary_falls_back_to_statistics(lake, home, tmp_path):
    files = lake.data_files()
    _rewrite_without_footer(files[0].path)
    s = read_file_summary(lake, files[0])
    assert (s.source, s.versions, s.missing_rows, s.rows) == ("statistics", {1: 50}, 0, 50)
    assert s.encrypted_columns == SENSITIVE

    # a mixed row group (versions 1 and 3, and a null) is counted exactly from its column
    table = pq.read_table(files[1].path)
    versions = [1] * 20 + [3] * 29 + [None]
    table = table.set_column(table.schema.get_field_index("_keyturn_version"), "_keyturn_version", pa.array(versions, pa.int64()))
    _rewrite_without_footer(files[1].path, table)
    s = read_file_summary(lake, files[1])
    assert (s.source, s.versions, s.missing_rows) == ("statistics", {1: 20, 3: 29}, 1)


def test_footer_that_disagrees_with_statistics_is_not_trusted(lake):
    f = lake.data_files()[0]
    table = pq.read_table(f.path)
    lying = footer_for(DATASET, f.partition, {2: 50}, 50, SENSITIVE)  # the data is on version 1
    write_parquet_atomically(lake, f.path, table, lying)
    s = read_file_summary(lake, f)
    assert (s.source, s.versions) == ("statistics", {1: 50})


def test_summary_of_plain_and_corrupt_files(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_parquet_atomically(lake, lake.path("r=1/plain.parquet"), pa.table({"id": [1, 2]}), None)
    good = lake.path("r=1/good.parquet")
    write_parquet_atomically(lake, good, pa.table({"id": list(range(100))}), None)
    data = open(good, "rb").read()
    open(lake.path("r=1/trunc.parquet"), "wb").write(data[: len(data) // 2])
    by_name = {os.path.basename(f.relpath): read_file_summary(lake, f) for f in lake.data_files()}
    assert (by_name["plain.parquet"].source, by_name["plain.parquet"].missing_rows) == ("none", 2)
    assert by_name["trunc.parquet"].error and "not a readable Parquet file" in by_name["trunc.parquet"].error
    assert by_name["trunc.parquet"].rows == 0


def test_inventory_counts_and_references(lake, home, tmp_path):
    inv = take_inventory(lake, home.policy(), dataset=DATASET)
    totals = inv.totals()
    assert (totals["files"], totals["rows"], totals["versions"], totals["current_fraction"]) == (6, 300, {"1": 300}, 1.0)
    assert set(inv.by_partition()) == {"region=0", "region=1", "region=2"}
    assert inv.by_partition()["region=1"]["files_by_version"] == {"1": 2}
    assert inv.references(1) == 300 and inv.references(2) == 0
    rotate(home)
    inv = take_inventory(lake, home.policy(), dataset=DATASET)
    assert inv.totals()["status_rows"]["stale"] == 300 and len(inv.stale_files()) == 6
    # the registry refuses to retire a version the lake still uses; an unreadable file counts too
    registry = home.registry()
    with pytest.raises(VersionInUseError):
        registry.retire(1, actor="t", reason="t", inventory=inv)
    open(lake.path("region=0/broken.parquet"), "wb").write(b"PAR1 nope")
    inv = take_inventory(lake, home.policy(), dataset=DATASET)
    assert inv.references(3) == 1
    assert [p["reason"] for p in inv.problems()] == ["unreadable"]


# -- lock -----------------------------------------------------------------------------


def test_lock_is_exclusive_and_dies_with_its_process(lake):
    with lake.lock(exclusive=True):
        with pytest.raises(LakeLockedError, match="locked by another keyturn job"):
            lake.lock(exclusive=True).acquire()
        with pytest.raises(LakeLockedError):
            lake.lock(exclusive=False).acquire()
    with lake.lock(exclusive=False), lake.lock(exclusive=False):
        with pytest.raises(LakeLockedError):
            lake.lock(exclusive=True).acquire()
    script = textwrap.dedent(f"""
        import sys, time
        from keyturn.lake import Lake
        lock = Lake({lake.uri!r}).lock().acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LakeLockedError, match=f"pid {proc.pid}"):
            lake.lock().acquire()
    finally:
        proc.kill()
        proc.wait()
    with lake.lock():  # the kernel released the dead holder's lock
        pass


def test_crashpoint_kills_only_when_named(tmp_path):
    code = "from keyturn.lake import crashpoint; crashpoint('x:y'); crashpoint('x:y'); print('alive')"
    env = {**os.environ, "KEYTURN_CRASHPOINT": "x:z"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "alive"
    env["KEYTURN_CRASHPOINT"] = "x:y"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == -signal.SIGKILL and out.stdout == ""
    env["KEYTURN_CRASHPOINT_SKIP"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0


# -- side outputs -----------------------------------------------------------------------


def test_side_output_parts_merge_without_loss_or_duplicates(lake):
    from keyturn.audit.events import build_event

    events = [
        build_event("rewrap", actor="t", reason="", dataset=DATASET, partition=f"p{i}", version_from=1,
                    version_to=2, counts={"rows": i}, scope_key=f"k{i}").to_dict()
        for i in range(3)
    ]
    write_side_output(lake, "audit", part_name("run-1", "a"), events[:2])
    write_side_output(lake, "audit", part_name("run-1", "b"), events[1:])
    assert write_side_output(lake, "audit", "run-1", []) is None
    compact_parts(lake, "audit")
    assert sorted(os.listdir(lake.keyturn_path("audit"))) == ["run-1.avro"]
    assert sorted(e["partition"] for e in read_side_outputs(lake, "audit", run_id="run-1")) == ["p0", "p1", "p2"]


# -- rewrite_file ---------------------------------------------------------------------------


def _sensitive_bytes(path):
    return pq.read_table(path, columns=SENSITIVE)


def _data_state(lake):
    """Every data file: relative path -> (bytes, mtime_ns)."""
    return {f.relpath: (open(f.path, "rb").read(), os.stat(f.path).st_mtime_ns) for f in lake.data_files()}


def _rewrite(lake, home, data_file, kms, **kwargs):
    """`rewrite_file` the way the reencrypt job calls it: with the registry's DEK directory and the dataset contract."""
    registry = home.registry()
    return rewrite_file(
        lake, data_file, kms=kms, policy=home.policy(), dataset=DATASET, directory=registry,
        contract=registry.get_contract(DATASET), **kwargs,
    )


def test_directory_rewrap_changes_no_lake_byte_and_makes_the_lake_current(lake, home, source):
    from keyturn.rotation import rewrap

    rotate(home)
    before = _data_state(lake)
    registry = home.registry()
    assert take_inventory(lake, home.policy(), dataset=DATASET, directory=registry).totals()["current_fraction"] == 0.0
    deks = registry.dek_count(1)
    assert deks == len(before) == 6  # one DEK per file
    with home.kms() as kms:
        report = rewrap(registry, kms, home.chain(), actor="tests", reason="rotate", dataset=DATASET)
    assert (report["deks_moved"], report["kms_calls"], report["complete"]) == (deks, deks, True)
    assert report["lake_bytes_written"] == 0 and registry.deks_by_version() == {2: deks}
    assert _data_state(lake) == before  # not one lake byte, not one mtime
    assert lake.temp_files() == []
    # the rows keep their birth version; the directory says they are on version 2 now
    assert all(v == {1: 50} for v in file_versions(lake.uri).values())
    inventory = take_inventory(lake, home.policy(), dataset=DATASET, directory=registry)
    assert inventory.totals()["current_fraction"] == 1.0 and inventory.versions() == {2: 300}
    assert inventory.stale_files() == [] and inventory.problems() == []
    assert all(read_file_summary(lake, f).source == "footer" for f in lake.data_files())
    event = home.chain().entries()[-1].event
    assert (event.action.value, event.version_from, event.version_to) == ("rewrap", 1, 2)
    assert len(event.kms_request_ids) == deks
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["current"] == 300 and statuses["stale"] == 0
    assert plain_equal(home, lake.uri, source)
    # nothing is left for the lake job: a rewrapped file is current, not rewritten, and costs no KMS call
    with home.kms() as kms:
        out = _rewrite(lake, home, lake.data_files()[0], kms)
    assert (out.result, out.reason, out.kms_calls) == ("unchanged", "no_stale_rows", 0)
    assert _data_state(lake) == before


def test_rewrite_file_refuses_the_rewrap_mode(lake, home):
    rotate(home)
    f = lake.data_files()[0]
    before = open(f.path, "rb").read()
    with home.kms() as kms, pytest.raises(ValueError, match="keyturn rewrap"):
        _rewrite(lake, home, f, kms, mode="rewrap")
    assert open(f.path, "rb").read() == before and lake.temp_files() == []


def test_reencrypt_changes_payload_not_plaintext(lake, home, source):
    rotate(home)
    f = lake.data_files()[1]
    before = _sensitive_bytes(f.path)
    registry = home.registry()
    with home.kms() as kms:
        out = _rewrite(lake, home, f, kms, mode="reencrypt")
    assert out.result == "rewritten" and out.audit["action"] == "reencrypt"
    assert out.versions_after == {2: 50} and file_versions(lake.uri)[f.relpath] == {2: 50}
    assert not _sensitive_bytes(f.path).equals(before)
    assert pq.ParquetFile(f.path).num_row_groups == 2  # row group by row group
    # the fresh DEK was registered under the active version before use
    summary = read_file_summary(lake, f)
    assert summary.source == "footer" and len(summary.dek_rows) == 1
    [entry] = registry.lookup_deks(summary.dek_rows).values()
    assert (entry.key_version, entry.birth_version, entry.partition) == (2, 2, f.partition)
    assert plain_equal(home, lake.uri, source)


def test_unreadable_rows_stay_in_place_and_corrupt_rows_are_quarantined(lake, home, tmp_path):
    rotate(home)
    with home.kms() as kms:
        kms.create_kek("kek-unknown")
    part = source_table(30, 1).drop_columns(["region"])
    path = write_encrypted_file(home, lake, "region=0", part, KekRef(1, "kek-0001"))
    table = pq.read_table(path)
    # append rows under a version the registry does not know, and one tampered cell
    unknown = pq.read_table(write_encrypted_file(home, Lake(str(tmp_path / "scratch")), "region=0", part.slice(0, 5), KekRef(9, "kek-unknown")))
    ssn = table.column("ssn").to_pylist()
    ssn[3] = ssn[3][:-1] + bytes([ssn[3][-1] ^ 1])
    table = table.set_column(table.schema.get_field_index("ssn"), table.schema.field("ssn"), pa.array(ssn, pa.binary()))
    mixed = pa.concat_tables([table, unknown.cast(table.schema)])
    write_parquet_atomically(lake, path, mixed, footer_for(DATASET, "region=0", {1: 30, 9: 5}, 35, SENSITIVE))
    data_file = next(f for f in lake.data_files() if f.path == path)
    with home.kms() as kms:
        out = _rewrite(lake, home, data_file, kms, mode="reencrypt")
    assert out.result == "rewritten", (out.reason, out.detail)
    assert out.status_rows["unknown"] == 5 and out.status_rows["corrupt"] == 1
    assert out.versions_after == {2: 29, 1: 1, 9: 5}  # the corrupt row keeps its version and bytes
    after = pq.read_table(path)
    assert after.num_rows == 35
    assert after.slice(30).to_pylist() == mixed.slice(30).to_pylist()  # unknown rows byte for byte
    assert after.slice(3, 1).to_pylist() == mixed.slice(3, 1).to_pylist()  # the corrupt row byte for byte
    assert [q["reason"] for q in out.quarantine] == ["corrupt"] and out.quarantine[0]["rows"] == 1


def test_failed_verification_keeps_the_original(lake, home, monkeypatch):
    rotate(home)
    import keyturn.lake.rewrite as rw

    real = rw._reseal

    def tampering(*args, **kwargs):
        sealed, changed = real(*args, **kwargs)
        ssn = sealed.column("ssn").to_pylist()
        i = next(k for k, v in enumerate(ssn) if v is not None)
        ssn[i] = ssn[i][:-1] + bytes([ssn[i][-1] ^ 1])  # a flipped payload bit must never reach the lake
        sealed = sealed.set_column(sealed.schema.get_field_index("ssn"), sealed.schema.field("ssn"), pa.array(ssn, pa.binary()))
        return sealed, changed

    monkeypatch.setattr(rw, "_reseal", tampering)
    f = lake.data_files()[0]
    before = open(f.path, "rb").read()
    with home.kms() as kms:
        out = _rewrite(lake, home, f, kms, mode="reencrypt")
    assert (out.result, out.reason) == ("failed", "verify_failed")
    assert open(f.path, "rb").read() == before
    assert lake.temp_files() == []
    assert out.quarantine[-1]["reason"] == "verify_failed"


def test_current_file_is_left_alone_without_kms_calls(lake, home):
    f = lake.data_files()[0]
    before = open(f.path, "rb").read()

    class NoKms:
        def __getattr__(self, name):
            raise AssertionError(f"KMS call {name}")

    out = rewrite_file(lake, f, kms=NoKms(), policy=home.policy(), dataset=DATASET)
    assert (out.result, out.reason, out.kms_calls) == ("unchanged", "no_stale_rows", 0)
    assert open(f.path, "rb").read() == before


def test_truncated_file_is_reported_not_touched(lake, home):
    rotate(home)
    f = lake.data_files()[0]
    data = open(f.path, "rb").read()
    open(f.path, "wb").write(data[:-100])
    with home.kms() as kms:
        out = rewrite_file(lake, f, kms=kms, policy=home.policy(), dataset=DATASET)
    assert (out.result, out.reason) == ("failed", "unparseable")
    assert open(f.path, "rb").read() == data[:-100]


def test_lake_plaintext_helper_sees_every_row(lake, home, source):
    got, statuses = lake_plaintext(home, lake.uri)
    assert got.num_rows == source.num_rows and statuses["current"] == 300


def test_rate_limited_kms_waits_for_tokens():
    from keyturn.kms.decorators import RateLimitedKms, TokenBucket

    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    class Inner:
        calls = 0

        def decrypt(self, *a):
            Inner.calls += 1
            return "ok"

    kms = RateLimitedKms(Inner(), TokenBucket(2, burst=2, clock=lambda: now[0], sleep=sleep))
    for _ in range(6):
        assert kms.decrypt("k", b"w", {}) == "ok"
    assert Inner.calls == 6
    assert slept == [0.5, 0.5, 0.5, 0.5]  # a burst of two, then one call every half second
    assert now[0] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        TokenBucket(0)
