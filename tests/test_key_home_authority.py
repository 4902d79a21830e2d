"""Hostile tests: the key home (registry + KMS) is the authority, a lake file is untrusted input.

Each test attacks one promise through the `keyturn` CLI (in-process, as in
tests/test_cli.py) or, at the end, through the library:

- a lake file whose contract column was replaced by plaintext (with and
  without keyturn's field metadata) never yields the forged values;
- stripped metadata (a real DuckDB compaction, a metadata-free pyarrow
  rewrite) with authentic cells reads normally;
- reencrypt leaves a downgraded file byte-identical and still moves the
  genuine ones;
- a write that breaks the pinned contract is refused before anything exists;
- retire is decided by the DEK directory, not by any lake (or its footer);
- `rotate --rewrap` changes no lake byte and makes one KMS call per DEK;
- a lost directory is rebuilt from genuine birth envelopes only;
- concurrent rotations keep the registry's versions sound.

One small lake is built once per module (`_base`) and copied per test.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_support import run_cli
from keyturn.audit.chain import AuditChain, verify_chain
from keyturn.format import parse_envelope
from keyturn.ipc import batch_from_ipc
from keyturn.lake import Lake
from keyturn.lake.footer import FOOTER_KEY
from keyturn.lake.sideoutputs import SideOutputDir, read_side_outputs
from keyturn.pipelines import exitcodes
from keyturn.home import KeyHome

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 300
REGIONS = 3
FORGED_MARK = "FORGED-"


# --------------------------------------------------------------------------- helpers


def source_table(n: int = N, start: int = 0, regions: range | None = None, extra: bool = False) -> pa.Table:
    ids = list(range(start, start + n))
    regs = list(regions) if regions is not None else list(range(REGIONS))
    data: dict[str, Any] = {
        "id": pa.array(ids, pa.int64()),
        "region": pa.array([regs[i % len(regs)] for i in ids], pa.int64()),
        "email": pa.array([f"user{i}@example.com" for i in ids], pa.string()),
        "ssn": pa.array([None if i % 17 == 0 else f"{i % 900 + 100:03d}-{i % 90 + 10:02d}-{i:04d}" for i in ids],
                        pa.string()),
    }
    if extra:
        data["phone"] = pa.array([f"+1-555-{i:04d}" for i in ids], pa.string())
    return pa.table(data)


def k(home: str, *argv: str):
    """`keyturn --home HOME --json ARGV...` in this process."""
    return run_cli("--home", home, "--json", *argv)


def data_files(lake: str) -> list[str]:
    """The lake's data files (hidden `_keyturn` and temp names skipped), sorted."""
    return sorted(os.path.join(lake, f.relpath) for f in Lake(lake).data_files())


def files_of(lake: str, partition: str) -> list[str]:
    return [p for p in data_files(lake) if os.path.basename(os.path.dirname(p)) == partition]


def fingerprint(paths: list[str]) -> dict[str, tuple[str, int]]:
    """{path: (sha256 of its bytes, mtime_ns)}."""
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def read_plain_out(out: str) -> pa.Table:
    """Every plain row under `out` as (id, region, email, ssn), region from the hive path, sorted by id."""
    tables = []
    for path in sorted(glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True)):
        if any(part.startswith(("_", ".")) for part in os.path.relpath(path, out).split(os.sep)):
            continue
        t = pq.read_table(path)
        t = t.replace_schema_metadata(None)
        region = int(os.path.basename(os.path.dirname(path)).split("=", 1)[1])
        if "region" in t.column_names:
            t = t.drop_columns(["region"])
        t = t.append_column("region", pa.array([region] * t.num_rows, pa.int64()))
        cols = [c for c in ("id", "region", "email", "ssn") if c in t.column_names]
        t = t.select(cols)
        t = pa.table({c: t.column(c).cast(pa.string()) if c in ("email", "ssn") else t.column(c) for c in cols})
        tables.append(t)
    if not tables:
        return pa.table({"id": pa.array([], pa.int64())})
    return pa.concat_tables(tables).sort_by("id")


def expected(table: pa.Table, regions: set[int] | None = None) -> pa.Table:
    t = table.select(["id", "region", "email", "ssn"])
    if regions is not None:
        mask = pa.array([r in regions for r in t.column("region").to_pylist()])
        t = t.filter(mask)
    return t.sort_by("id")


def all_strings_under(root: str) -> list[str]:
    """Every string/binary value of every Parquet file under `root` (to hunt for forged values)."""
    values: list[str] = []
    for path in glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True):
        t = pq.read_table(path)
        for col in t.columns:
            typ = col.type
            if pa.types.is_dictionary(typ):
                col = col.cast(typ.value_type)
                typ = typ.value_type
            if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                values += [v for v in col.to_pylist() if v is not None]
            elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
                values += [v.decode("utf-8", "replace") for v in col.to_pylist() if v is not None]
    return values


def raw_bytes_contain(root: str, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                if needle in f.read():
                    hits.append(path)
    return hits


def read_lake_file(path: str) -> pa.Table:
    """A lake file as a table whose schema metadata is the file's Parquet key-value metadata (the keyturn footer)."""
    t = pq.read_table(path)
    kv = {k: v for k, v in (pq.ParquetFile(path).metadata.metadata or {}).items() if k != b"ARROW:schema"}
    assert FOOTER_KEY in kv, f"{path} has no keyturn footer"
    return t.replace_schema_metadata({**(t.schema.metadata or {}), **kv})


def forge_plain_column(path: str, column: str, *, metadata: str) -> list[str]:
    """Replace `column` of a lake file by a plain string column of forged values; returns the forged values.

    metadata "kept": the forged column keeps the original field's keyturn metadata; "column-bare": the forged
    column has none, the other columns keep theirs; "file-stripped": no field of the file has any. The
    file's key-value metadata (the keyturn footer) is kept in every case.
    """
    assert metadata in ("kept", "column-bare", "file-stripped")
    t = read_lake_file(path)
    schema_meta = t.schema.metadata
    forged = [f"{FORGED_MARK}{i}@evil.example" for i in t.column("id").to_pylist()]
    original = t.schema.field(column)
    field = pa.field(column, pa.string(), nullable=True, metadata=original.metadata if metadata == "kept" else None)
    t = t.set_column(t.schema.get_field_index(column), field, pa.array(forged, pa.string()))
    if metadata == "file-stripped":
        t = t.cast(pa.schema([pa.field(f.name, f.type, f.nullable) for f in t.schema]))
    t = t.replace_schema_metadata(schema_meta)
    pq.write_table(t, path)
    back = pq.ParquetFile(path)
    assert FOOTER_KEY in back.metadata.metadata
    assert back.schema_arrow.field(column).type == pa.string()
    return forged


def rewrite_without_metadata(path: str) -> None:
    """Rewrite a lake file with pyarrow, no field metadata, no schema metadata, no stored Arrow schema."""
    t = pq.read_table(path)
    fields = []
    for f in t.schema:
        typ = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        fields.append(pa.field(f.name, typ, f.nullable))
    t = t.cast(pa.schema(fields))
    t = t.replace_schema_metadata(None)
    os.remove(path)
    pq.write_table(t, path, store_schema=False)
    back = pq.ParquetFile(path)
    assert not back.metadata.metadata or FOOTER_KEY not in back.metadata.metadata
    assert all(not f.metadata for f in back.schema_arrow)


def quarantined_rows(report: dict) -> tuple[int, pa.Table | None]:
    """The corrupt rows a decrypt run quarantined (its side outputs are under its output, not in the lake)."""
    records = read_side_outputs(SideOutputDir.of(Lake(report["side_outputs"])), "quarantine", run_id=report["run_id"])
    corrupt = [r for r in records if r["reason"] == "corrupt"]
    batches = [batch_from_ipc(r["payload"]) for r in corrupt if r["payload_format"] == "arrow_ipc"]
    rows = sum(int(r["rows"]) for r in corrupt)
    table = pa.Table.from_batches(batches) if batches else None
    return rows, table


def kms_counting(monkeypatch) -> dict[str, int]:
    """Count every LocalKms generate/decrypt/rewrap made in this process."""
    from keyturn.kms.local import LocalKms

    calls = {"generate_data_key": 0, "decrypt": 0, "rewrap": 0}
    for name in calls:
        original = getattr(LocalKms, name)

        def wrapper(self, *a, __name=name, __orig=original, **kw):
            calls[__name] += 1
            return __orig(self, *a, **kw)

        monkeypatch.setattr(LocalKms, name, wrapper)
    return calls


def status_without_time(result) -> dict[str, Any]:
    data = result.json()
    data.pop("taken_at", None)
    return data


# --------------------------------------------------------------------------- the module's lake


@dataclass
class World:
    root: str
    home: str
    lake: str
    src: str
    table: pa.Table
    registry_after_init: str  # a copy of registry.sqlite taken right after `init`

    def registry(self):
        return KeyHome.open(self.home).registry()


@pytest.fixture(scope="module")
def _base(tmp_path_factory) -> World:
    root = str(tmp_path_factory.mktemp("authority-base"))
    home, lake, src = (os.path.join(root, n) for n in ("home", "lake", "src"))
    table = source_table()
    os.makedirs(src)
    pq.write_table(table.slice(0, 170), os.path.join(src, "a.parquet"))
    pq.write_table(table.slice(170), os.path.join(src, "b.parquet"))
    r = run_cli("--home", home, "init", "--dataset", "customers")
    assert r.code == 0, r.err
    backup = os.path.join(root, "registry-after-init.sqlite")
    shutil.copy2(os.path.join(home, "registry.sqlite"), backup)
    r = k(home, "encrypt", "--source", src, "--lake", lake, "--columns", "email,ssn", "--partition-by", "region")
    assert r.code == 0, r.err
    assert r.json()["rows_written"] == N
    assert len(data_files(lake)) == REGIONS
    return World(root, home, lake, src, table, backup)


@pytest.fixture
def world(_base, tmp_path) -> World:
    """A private copy of the module's home, lake and source."""
    root = str(tmp_path / "w")
    shutil.copytree(_base.root, root, symlinks=True)
    return World(
        root,
        os.path.join(root, "home"),
        os.path.join(root, "lake"),
        os.path.join(root, "src"),
        _base.table,
        os.path.join(root, "registry-after-init.sqlite"),
    )


def decrypt(world: World, name: str = "out", *extra: str):
    out = os.path.join(world.root, name)
    return k(world.home, "decrypt", "--lake", world.lake, "--out", out, *extra), out


# --------------------------------------------------------------------------- 1. forged plain column


@pytest.mark.parametrize("how", ["kept", "column-bare", "file-stripped", "column-dropped"])
def test_forged_plain_column_is_quarantined_never_clear(world, how):
    [victim] = files_of(world.lake, "region=1")
    if how == "column-dropped":
        t = read_lake_file(victim)
        pq.write_table(t.drop_columns(["email"]), victim)
        forged = None
    else:
        forged = forge_plain_column(victim, "email", metadata=how)
    victim_ids = pq.read_table(victim, columns=["id"]).column("id").to_pylist()
    assert len(victim_ids) == N // REGIONS

    result, out = decrypt(world)
    assert result.code == exitcodes.DATA, (result.code, result.out, result.err)
    report = result.json()
    assert report["rows_by_status"]["corrupt"] == len(victim_ids), report["rows_by_status"]
    assert report["rows_written"] == N - len(victim_ids)

    # not one forged value anywhere in the output, by value or by bytes
    leaked = [v for v in all_strings_under(out) if FORGED_MARK in v]
    assert leaked == [], leaked[:5]
    assert raw_bytes_contain(out, FORGED_MARK.encode()) == []

    # the victim's rows are in quarantine, with their original bytes
    rows, table = quarantined_rows(report)
    assert rows == len(victim_ids)
    assert table is not None and sorted(table.column("id").to_pylist()) == sorted(victim_ids)
    if forged is not None:
        got = dict(zip(table.column("id").to_pylist(), table.column("email").cast(pa.string()).to_pylist()))
        assert got == dict(zip(victim_ids, forged))
    else:
        assert "email" not in table.column_names

    # the other files' rows decrypt to the source
    back = read_plain_out(out)
    assert back.equals(expected(world.table, {0, 2})), back
    assert os.path.exists(victim)

    # status counts the downgraded file's rows as a problem, never as current
    status = k(world.home, "status", "--lake", world.lake)
    assert status.code == exitcodes.DATA, status.out
    assert status.json()["status_rows"]["current"] == N - len(victim_ids)


# --------------------------------------------------------------------------- 2. stripped metadata, authentic cells


def test_duckdb_compaction_and_metadata_free_rewrite_read_normally(world):
    import duckdb

    part0 = os.path.join(world.lake, "region=0")
    originals = files_of(world.lake, "region=0")
    compacted = os.path.join(part0, "compacted-by-duckdb.parquet")
    con = duckdb.connect()
    try:
        glob_path = os.path.join(part0, "*.parquet").replace("'", "''")
        con.execute(f"COPY (SELECT * FROM read_parquet('{glob_path}')) TO '{compacted}' (FORMAT PARQUET)")
    finally:
        con.close()
    for p in originals:
        os.remove(p)
    assert files_of(world.lake, "region=0") == [compacted]
    schema = pq.ParquetFile(compacted).schema_arrow
    assert all(not f.metadata for f in schema), "DuckDB dropped keyturn's field metadata"
    assert not pa.types.is_dictionary(schema.field("_keyturn_dek").type)

    [one] = files_of(world.lake, "region=1")
    rewrite_without_metadata(one)

    result, out = decrypt(world)
    assert result.code == exitcodes.OK, (result.out, result.err)
    report = result.json()
    assert report["rows_written"] == N and report["rows_not_written"] == 0
    assert read_plain_out(out).equals(expected(world.table))

    status = k(world.home, "status", "--lake", world.lake)
    assert status.code == exitcodes.OK, (status.out, status.err)
    data = status.json()
    assert data["rows"] == N and data["status_rows"]["current"] == N, data["status_rows"]


def test_decrypt_columns_subset_after_duckdb_compaction(world):
    """`decrypt --columns ssn` is also decided by the contract, not by the (stripped) file metadata."""
    import duckdb

    for region in range(REGIONS):
        part = os.path.join(world.lake, f"region={region}")
        originals = files_of(world.lake, f"region={region}")
        con = duckdb.connect()
        try:
            con.execute(
                f"COPY (SELECT * FROM read_parquet('{part}/*.parquet', hive_partitioning = false)) "
                f"TO '{part}/compacted.parquet' (FORMAT PARQUET)"
            )
        finally:
            con.close()
        for p in originals:
            os.remove(p)
    result, out = decrypt(world, "out", "--columns", "ssn")
    assert result.code == exitcodes.OK, (result.out, result.err)
    back = read_plain_out(out)
    assert "email" not in back.column_names
    assert back.equals(expected(world.table).select(["id", "region", "ssn"])), back


# --------------------------------------------------------------------------- 3. reencrypt after a downgrade


@pytest.mark.parametrize("metadata", ["kept", "column-bare", "file-stripped"])
def test_reencrypt_leaves_downgraded_file_byte_identical_and_moves_the_rest(world, metadata):
    assert k(world.home, "rotate").code == 0  # v2 active; every DEK still wrapped under v1 (stale)
    [victim] = files_of(world.lake, "region=1")
    forge_plain_column(victim, "email", metadata=metadata)
    victim_before = fingerprint([victim])
    victim_deks = {parse_envelope(e).dek_id for e in pq.read_table(victim, columns=["_keyturn_dek"])
                   .column(0).combine_chunks().dictionary.to_pylist()}
    genuine = [p for p in data_files(world.lake) if p != victim]
    genuine_before = fingerprint(genuine)

    result = k(world.home, "reencrypt", "--lake", world.lake, "--mode", "reencrypt")
    assert result.code in (exitcodes.OK, exitcodes.DATA), (result.code, result.out, result.err)
    report = result.json()
    assert fingerprint([victim]) == victim_before, "the downgraded file was rewritten"
    rel = os.path.relpath(victim, world.lake)
    assert any(p.get("path") == rel for p in report["problems"]), report["problems"]
    assert report["files_rewritten"] == len(genuine)
    after = fingerprint(genuine)
    assert all(after[p][0] != genuine_before[p][0] for p in genuine), "the genuine stale files were not re-encrypted"

    # every envelope a cell still names is still in the directory
    entries = world.registry().lookup_deks(victim_deks)
    assert set(entries) == victim_deks

    dec, out = decrypt(world)
    assert dec.code == exitcodes.DATA
    assert [v for v in all_strings_under(out) if FORGED_MARK in v] == []
    assert read_plain_out(out).equals(expected(world.table, {0, 2}))
    status = k(world.home, "status", "--lake", world.lake).json()
    assert status["status_rows"]["stale"] == 0 and status["status_rows"]["current"] == N - N // REGIONS


# --------------------------------------------------------------------------- 4. a write that breaks the contract


@pytest.mark.parametrize(
    "columns, extra, ssn_type, partition_by",
    [
        ("email", False, None, "region"),
        ("email,ssn,phone", True, None, "region"),
        ("email,ssn", False, pa.int64(), "region"),
        ("email,ssn", False, None, None),
    ],
    ids=["fewer-columns", "more-columns", "ssn-type-changed", "unpartitioned"],
)
def test_encrypt_breaking_the_contract_is_refused(world, columns, extra, ssn_type, partition_by):
    newsrc = os.path.join(world.root, "newsrc")
    os.makedirs(newsrc)
    new = source_table(60, start=10_000, regions=range(7, 9), extra=extra)  # new partitions: nothing would be skipped
    if ssn_type is not None:
        new = new.set_column(new.schema.get_field_index("ssn"), "ssn", pa.array(range(60), ssn_type))
    pq.write_table(new, os.path.join(newsrc, "n.parquet"))
    files_before = fingerprint(data_files(world.lake))
    reg = world.registry()
    deks_before = reg.deks_by_version()
    contract_before = reg.get_contract("customers").to_text()
    status_before = status_without_time(k(world.home, "status", "--lake", world.lake))
    audit_before = len(AuditChain(os.path.join(world.home, "audit.log")).entries())

    argv = ["encrypt", "--source", newsrc, "--lake", world.lake, "--columns", columns]
    if partition_by:
        argv += ["--partition-by", partition_by]
    result = k(world.home, *argv)
    assert result.code == exitcodes.USAGE, (result.code, result.out, result.err)
    assert "dataset 'customers'" in result.err, result.err  # the refusal names the pinned contract's dataset

    assert fingerprint(data_files(world.lake)) == files_before, "a file was written or changed"
    assert not [p for p in glob.glob(os.path.join(world.lake, "_keyturn", "staging", "**", "*"), recursive=True)
                if os.path.isfile(p)]
    reg = world.registry()
    assert reg.deks_by_version() == deks_before
    assert reg.get_contract("customers").to_text() == contract_before
    assert status_without_time(k(world.home, "status", "--lake", world.lake)) == status_before
    assert len(AuditChain(os.path.join(world.home, "audit.log")).entries()) == audit_before

    # the lake never holds plaintext ssn: every ssn column is ciphertext and no new value appears
    new_ssn = [str(v) for v in new.column("ssn").to_pylist() if v]
    for path in glob.glob(os.path.join(world.lake, "**", "*.parquet"), recursive=True):
        schema = pq.ParquetFile(path).schema_arrow
        if "ssn" in schema.names:
            assert not pa.types.is_string(schema.field("ssn").type), path
    assert not set(new_ssn) & set(all_strings_under(world.lake))
    if ssn_type is None:
        assert raw_bytes_contain(world.lake, new_ssn[1].encode()) == []
        assert raw_bytes_contain(world.lake, new.column("email").to_pylist()[3].encode()) == []


# --------------------------------------------------------------------------- 5. retire is the directory's call


def forge_footer_versions(path: str, version: int) -> None:
    t = read_lake_file(path)
    meta = dict(t.schema.metadata)
    footer = json.loads(meta[FOOTER_KEY])
    footer["versions"] = {str(version): footer["rows"]}
    meta[FOOTER_KEY] = json.dumps(footer, sort_keys=True, separators=(",", ":")).encode()
    pq.write_table(t.replace_schema_metadata(meta), path)


def test_retire_refused_while_directory_holds_deks_whatever_the_lake_says(world):
    assert k(world.home, "rotate").code == 0
    assert world.registry().dek_count(1) == REGIONS
    empty = os.path.join(world.root, "empty-lake")
    os.makedirs(empty)

    r = k(world.home, "retire", "1")
    assert r.code == exitcodes.REFUSED, (r.code, r.out, r.err)
    r = k(world.home, "retire", "1", "--lake", empty)
    assert r.code == exitcodes.REFUSED, (r.code, r.out, r.err)

    for path in data_files(world.lake):
        forge_footer_versions(path, 2)
        assert json.loads(pq.ParquetFile(path).metadata.metadata[FOOTER_KEY])["versions"] == {"2": N // REGIONS}
    r = k(world.home, "retire", "1", "--lake", world.lake)
    assert r.code == exitcodes.REFUSED, (r.code, r.out, r.err)
    r = k(world.home, "retire", "1", "--lake", empty, "--lake", world.lake)
    assert r.code == exitcodes.REFUSED, (r.code, r.out, r.err)
    assert world.registry().get(1).state.value == "decrypt_only"

    rw = k(world.home, "rewrap")
    assert rw.code == 0, (rw.out, rw.err)
    assert rw.json()["deks_moved"] == REGIONS
    assert world.registry().dek_count(1) == 0
    r = k(world.home, "retire", "1", "--lake", world.lake)
    assert r.code == 0, (r.code, r.out, r.err)
    assert world.registry().get(1).state.value == "retired"

    result, out = decrypt(world)
    assert result.code == exitcodes.OK, (result.out, result.err)
    assert read_plain_out(out).equals(expected(world.table))


# --------------------------------------------------------------------------- 6. rotate --rewrap touches no lake byte


def test_rotate_rewrap_changes_no_lake_byte_one_kms_call_per_dek(world, monkeypatch):
    reg = world.registry()
    deks = reg.dek_count()
    assert deks == REGIONS
    shown = k(world.home, "directory", "show").json()
    assert sum(shown["deks_by_version"].values()) == deks
    before_entries = {e.dek_id: e for e in reg.list_deks()}
    lake_before = fingerprint(data_files(world.lake))
    audit_path = os.path.join(world.home, "audit.log")
    audit_before = len(AuditChain(audit_path).entries())

    calls = kms_counting(monkeypatch)
    r = k(world.home, "rotate", "--rewrap")
    assert r.code == 0, (r.out, r.err)
    report = r.json()
    assert report["version_to"] == 2
    assert report["rewrap"]["kms_calls"] == deks and report["rewrap"]["deks_moved"] == deks
    assert calls["rewrap"] == deks, calls  # counted at the KMS itself
    assert calls["generate_data_key"] == 0

    after_entries = {e.dek_id: e for e in world.registry().list_deks()}
    assert set(after_entries) == set(before_entries)
    for dek_id, entry in after_entries.items():
        assert entry.key_version == 2 and entry.envelope != before_entries[dek_id].envelope
        assert entry.birth_version == 1 and entry.birth_commitment == before_entries[dek_id].birth_commitment

    events = [e.event for e in AuditChain(audit_path).entries()[audit_before:]]
    assert [e.action.value for e in events] == ["rotate", "rewrap"]
    assert events[1].counts["kms_calls"] == deks and events[1].counts["deks_moved"] == deks

    assert fingerprint(data_files(world.lake)) == lake_before
    status = k(world.home, "status", "--lake", world.lake)
    assert status.code == 0
    assert status.json()["percent_current"] == 100.0 and status.json()["status_rows"]["current"] == N

    result, out = decrypt(world)
    assert result.code == 0, (result.out, result.err)
    assert read_plain_out(out).equals(expected(world.table))

    for key in calls:
        calls[key] = 0
    again = k(world.home, "rewrap")
    assert again.code == 0
    assert again.json()["kms_calls"] == 0 and again.json()["deks_moved"] == 0
    assert calls["rewrap"] == 0
    assert len(AuditChain(audit_path).entries()) == audit_before + 2
    assert fingerprint(data_files(world.lake)) == lake_before


# --------------------------------------------------------------------------- 7. directory loss and rebuild


def restore_registry(world: World) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        p = os.path.join(world.home, "registry.sqlite" + suffix)
        if os.path.exists(p):
            os.remove(p)
    shutil.copy2(world.registry_after_init, os.path.join(world.home, "registry.sqlite"))


def test_directory_loss_then_rebuild(world):
    restore_registry(world)
    assert world.registry().dek_count() == 0

    lost, out = decrypt(world, "out-lost")
    assert lost.code == exitcodes.DATA, (lost.out, lost.err)
    assert lost.json()["rows_by_status"]["unknown"] == N
    assert lost.json()["rows_written"] == 0

    rb = k(world.home, "directory", "rebuild", "--lake", world.lake)
    assert rb.code == 0, (rb.out, rb.err)
    assert rb.json()["deks_registered"] == REGIONS and rb.json()["problems"] == []
    assert world.registry().dek_count(1) == REGIONS

    again = k(world.home, "directory", "rebuild", "--lake", world.lake)
    assert again.code == 0 and again.json()["deks_registered"] == 0

    result, out = decrypt(world, "out-rebuilt")
    assert result.code == exitcodes.OK, (result.out, result.err)
    assert read_plain_out(out).equals(expected(world.table))


def _dek_envelope(path: str) -> bytes:
    [env] = pq.read_table(path, columns=["_keyturn_dek"]).column(0).combine_chunks().dictionary.to_pylist()
    return env


def plant_moved_envelope(world: World, victim_partition: str, donor_partition: str) -> tuple[str, bytes]:
    """A new file in `victim_partition`: a copy of its file with every `_keyturn_dek` envelope swapped for
    the donor partition's (footer adjusted to name the donor's DEK). Returns (path, donor envelope)."""
    [victim] = files_of(world.lake, victim_partition)
    [donor] = files_of(world.lake, donor_partition)
    donor_env = _dek_envelope(donor)
    t = read_lake_file(victim)
    meta = dict(t.schema.metadata)
    idx = t.schema.get_field_index("_keyturn_dek")
    swapped = pa.DictionaryArray.from_arrays(pa.array([0] * t.num_rows, pa.int32()), pa.array([donor_env], pa.binary()))
    t = t.set_column(idx, t.schema.field(idx), swapped)
    footer = json.loads(meta[FOOTER_KEY])
    footer["deks"] = {parse_envelope(donor_env).dek_id.hex(): t.num_rows}
    meta[FOOTER_KEY] = json.dumps(footer, sort_keys=True, separators=(",", ":")).encode()
    path = os.path.join(os.path.dirname(victim), "part-0-moved-envelopes.parquet")
    pq.write_table(t.replace_schema_metadata(meta), path)
    return path, donor_env


def test_rebuild_never_registers_a_moved_envelope(world):
    genuine = {parse_envelope(_dek_envelope(p)).dek_id: os.path.basename(os.path.dirname(p)) for p in data_files(world.lake)}
    forged, donor_env = plant_moved_envelope(world, "region=1", "region=2")
    donor_id = parse_envelope(donor_env).dek_id
    restore_registry(world)

    rb = k(world.home, "directory", "rebuild", "--lake", world.lake)
    data = rb.json()
    reasons = [(p.get("reason"), p.get("partition")) for p in data["problems"]]
    assert ("not_genuine", "region=1") in reasons, data
    for entry in world.registry().list_deks():
        assert (entry.dek_id, entry.partition) != (donor_id, "region=1"), "a moved envelope was registered"
        assert entry.partition == genuine[entry.dek_id]

    # the forged file's rows never read as clear data
    result, out = decrypt(world)
    assert result.code == exitcodes.DATA
    back = read_plain_out(out)
    ids = back.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "rows of the forged copy were written"
    forged_rows = pq.read_metadata(forged).num_rows
    status = result.json()["rows_by_status"]
    assert status["current"] + status["stale"] == len(ids) <= N
    assert sum(status.values()) == N + forged_rows
    assert os.path.exists(forged)


def test_rebuild_registers_the_genuine_copy_of_an_envelope_also_planted_elsewhere(world):
    """A forged file naming partition region=2's envelope from region=1 must not stop the genuine
    region=2 envelope (in region=2's own file) from being recreated."""
    _, donor_env = plant_moved_envelope(world, "region=1", "region=2")
    donor_id = parse_envelope(donor_env).dek_id
    restore_registry(world)

    rb = k(world.home, "directory", "rebuild", "--lake", world.lake)
    assert rb.json()["deks_in_lake"] == REGIONS
    entry = world.registry().lookup_deks([donor_id]).get(donor_id)
    assert entry is not None, f"the genuine DEK of region=2 was not rebuilt; rebuild report: {rb.json()}"
    assert entry.partition == "region=2"
    assert world.registry().dek_count() == REGIONS

    result, out = decrypt(world)
    back = read_plain_out(out)
    assert expected(world.table, {2}).column("id").to_pylist() == [
        i for i, r in zip(back.column("id").to_pylist(), back.column("region").to_pylist()) if r == 2
    ]


# --------------------------------------------------------------------------- 8. concurrent rotations


_SYNCED_CLI = """
import os, sys, time, uuid
import keyturn.pipelines.cli, keyturn.home, keyturn.rotation, keyturn.kms.local, keyturn.registry.sqlite
barrier, parties = sys.argv[1], int(sys.argv[2])
open(os.path.join(barrier, uuid.uuid4().hex), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir(barrier)) < parties and time.monotonic() < deadline:
    time.sleep(0.0005)
sys.exit(keyturn.pipelines.cli.main(sys.argv[3:]))
"""


def test_concurrent_rotate_keeps_versions_sound(tmp_path):
    home = str(tmp_path / "home")
    assert run_cli("--home", home, "init", "--dataset", "customers").code == 0
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KEYTURN_NOW", None)
    codes: list[int] = []
    errors: list[str] = []
    for round_ in range(5):
        if round_ == 0:  # exactly `python -m keyturn.pipelines.cli --home H rotate`
            argvs = [[sys.executable, "-m", "keyturn.pipelines.cli", "--home", home, "rotate"]] * 4
        else:  # the same `keyturn.pipelines.cli.main`, started together once all four have imported it
            barrier = tmp_path / f"barrier-{round_}"
            barrier.mkdir()
            argvs = [[sys.executable, "-c", _SYNCED_CLI, str(barrier), "4", "--home", home, "rotate"]] * 4
        procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=str(tmp_path))
            for argv in argvs
        ]
        for p in procs:
            out, err = p.communicate(timeout=120)
            codes.append(p.returncode)
            if p.returncode not in (0, 5):
                errors.append(f"exit {p.returncode}: {err.strip()}")
    successes = codes.count(0)
    assert successes >= 5  # at least one rotation per round

    reg = KeyHome.open(home).registry()
    versions = reg.versions()
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert len(versions) == 1 + successes
    assert [v.state.value for v in versions].count("active") == 1
    assert versions[-1].state.value == "active"
    kek_ids = [v.kek_id for v in versions]
    assert len(set(kek_ids)) == len(kek_ids)

    # every version's KEK is in the keystore and usable
    from keyturn.scope import KekRef, Location
    from keyturn.reader import DekReader
    from keyturn.scope import DekScope

    h = KeyHome.open(home)
    with h.kms() as kms:
        for v in versions:
            where = Location("customers", "p")
            with DekScope(kms, KekRef(v.version, v.kek_id), where) as scope:
                sealed = scope.seal_rows(["c"], [[b"x"]], None, types=["arrow:string"])
            with DekReader(kms) as reader:
                assert reader.open(sealed.envelopes[0], where) is not None

    # every successful rotation is in the audit log, and the chain is intact
    log = os.path.join(home, "audit.log")
    assert verify_chain(log) == 1 + successes
    rotations = [e.event for e in AuditChain(log).entries()][1:]
    assert sorted(e.version_to for e in rotations) == list(range(2, 2 + successes))

    # a process that lost the race is refused (5), never a usage (2), internal (1) or outage (4) error
    assert set(codes) <= {0, 5}, (codes, errors)


# --------------------------------------------------------------------------- 9. library level


def _library_setup(tmp_path):
    from keyturn.contract import arrow_contract
    from keyturn.kms.local import LocalKms
    from keyturn.policy import KeyPolicy
    from keyturn.registry.sqlite import SqliteKeyRegistry
    from keyturn.scope import KekRef, Location

    registry = SqliteKeyRegistry(str(tmp_path / "registry.sqlite"))
    registry.initialize("kek-1", actor="t", reason="t")
    kms = LocalKms.in_memory({"kek-1": os.urandom(32), "kek-2": os.urandom(32)})
    plain = pa.record_batch({
        "id": pa.array(range(50), pa.int64()),
        "email": pa.array([f"u{i}@example.com" for i in range(50)], pa.string()),
        "ssn": pa.array([None if i % 7 == 0 else f"{i:03d}-11-2222" for i in range(50)], pa.string()),
    })
    contract = registry.pin_contract(arrow_contract("customers", plain.schema, ["email", "ssn"]), actor="t", reason="t")
    location = Location("customers", "region=1")
    return registry, kms, plain, contract, location, KeyPolicy.from_registry(registry), KekRef(1, "kek-1")


@pytest.mark.parametrize("how", ["plaintext-with-metadata", "plaintext-no-metadata", "column-dropped"])
def test_library_downgraded_batch_is_all_corrupt_and_unchanged(tmp_path, how):
    from keyturn.arrow_codec import decrypt_batch, encrypt_batch, reencrypt_batch
    from keyturn.policy import ReadStatus
    from keyturn.reader import DekReader
    from keyturn.scope import DekScope

    registry, kms, plain, contract, location, policy, kek = _library_setup(tmp_path)
    with DekScope(kms, kek, location, directory=registry, contract_revision=contract.revision) as scope:
        sealed = encrypt_batch(plain, ["email", "ssn"], scope, contract=contract)
    assert registry.dek_count() == 1

    forged_values = [f"{FORGED_MARK}{i}" for i in range(plain.num_rows)]
    idx = sealed.schema.get_field_index("email")
    if how == "column-dropped":
        forged = sealed.drop_columns(["email"])
    else:
        meta = sealed.schema.field("email").metadata if how == "plaintext-with-metadata" else None
        forged = sealed.set_column(idx, pa.field("email", pa.string(), metadata=meta), pa.array(forged_values))

    with DekReader(kms, directory=registry) as reader:
        # control: the genuine batch reads back
        ok = decrypt_batch(sealed, reader, policy, location, contract=contract)
        assert ok.plain.select(["id", "email", "ssn"]).equals(plain)

        result = decrypt_batch(forged, reader, policy, location, contract=contract)
        assert set(result.status) == {ReadStatus.CORRUPT}
        assert result.plain.num_rows == 0
        for col in result.plain.columns:
            assert not any(isinstance(v, str) and FORGED_MARK in v for v in col.to_pylist())
        assert result.rows_with(ReadStatus.CORRUPT).equals(forged)

        with DekScope(kms, kek, location, directory=registry, contract_revision=contract.revision) as scope2:
            again = reencrypt_batch(forged, reader, scope2, policy, location, contract=contract)
        assert again.changed is False
        assert again.batch.equals(forged) and again.batch.schema.equals(forged.schema, check_metadata=True)
        assert set(again.status) == {ReadStatus.CORRUPT}


def test_library_stripped_metadata_reads_normally_with_contract(tmp_path):
    from keyturn.arrow_codec import decrypt_batch, encrypt_batch
    from keyturn.policy import ReadStatus
    from keyturn.reader import DekReader
    from keyturn.scope import DekScope

    registry, kms, plain, contract, location, policy, kek = _library_setup(tmp_path)
    with DekScope(kms, kek, location, directory=registry, contract_revision=contract.revision) as scope:
        sealed = encrypt_batch(plain, ["email", "ssn"], scope, contract=contract)
    fields = [pa.field(f.name, pa.large_binary() if f.name in ("email", "ssn") else
                       (f.type.value_type if pa.types.is_dictionary(f.type) else f.type)) for f in sealed.schema]
    stripped = pa.RecordBatch.from_arrays(
        [c.cast(f.type) for c, f in zip(sealed.columns, fields)], schema=pa.schema(fields)
    )
    with DekReader(kms, directory=registry) as reader:
        result = decrypt_batch(stripped, reader, policy, location, contract=contract)
    assert set(result.status) == {ReadStatus.CURRENT}
    assert result.plain.select(["id", "email", "ssn"]).equals(plain)


def test_library_unregistered_dek_is_unknown(tmp_path):
    """A DEK the directory does not know is `unknown`, even though the KMS would unwrap its envelope."""
    from keyturn.arrow_codec import decrypt_batch, encrypt_batch
    from keyturn.policy import ReadStatus
    from keyturn.reader import DekReader
    from keyturn.scope import DekScope

    registry, kms, plain, contract, location, policy, kek = _library_setup(tmp_path)
    with DekScope(kms, kek, location) as scope:  # no directory: never registered
        sealed = encrypt_batch(plain, ["email", "ssn"], scope, contract=contract)
    assert registry.dek_count() == 0
    with DekReader(kms, directory=registry) as reader:
        result = decrypt_batch(sealed, reader, policy, location, contract=contract)
    assert set(result.status) == {ReadStatus.UNKNOWN}
    assert result.plain.num_rows == 0


def _sealed_lib(tmp_path):
    from keyturn.arrow_codec import encrypt_batch
    from keyturn.scope import DekScope

    registry, kms, plain, contract, location, policy, kek = _library_setup(tmp_path)
    with DekScope(kms, kek, location, directory=registry, contract_revision=contract.revision) as scope:
        sealed = encrypt_batch(plain, ["email", "ssn"], scope, contract=contract)
    return registry, kms, plain, contract, location, policy, sealed


@pytest.mark.parametrize("how", ["duplicated-contract-column", "duplicated-plain-column", "version-as-list", "dek-as-string"])
def test_library_a_hostile_shape_is_all_corrupt_and_never_raises(tmp_path, how):
    """Duplicated column names or mistyped key columns: every row corrupt (kept), no exception, nothing returned."""
    from keyturn.arrow_codec import decrypt_batch, reencrypt_batch
    from keyturn.policy import ReadStatus
    from keyturn.reader import DekReader
    from keyturn.scope import DekScope

    registry, kms, plain, contract, location, policy, sealed = _sealed_lib(tmp_path)
    n = sealed.num_rows
    if how == "duplicated-contract-column":
        hostile = pa.RecordBatch.from_arrays(
            [*sealed.columns, pa.array([f"{FORGED_MARK}{i}" for i in range(n)])], names=[*sealed.schema.names, "ssn"]
        )
    elif how == "duplicated-plain-column":
        hostile = pa.RecordBatch.from_arrays([*sealed.columns, sealed.column("id")], names=[*sealed.schema.names, "id"])
    else:
        name = "_keyturn_version" if how == "version-as-list" else "_keyturn_dek"
        value = pa.array([[1]] * n) if how == "version-as-list" else pa.array(["x"] * n)
        i = sealed.schema.get_field_index(name)
        hostile = sealed.set_column(i, name, value)
    with DekReader(kms, directory=registry) as reader:
        result = decrypt_batch(hostile, reader, policy, location, contract=contract)
        assert result.status == [ReadStatus.CORRUPT] * n and result.plain.num_rows == 0
        assert result.rows_with(ReadStatus.CORRUPT).num_rows == n  # the original rows, kept
        with DekScope(kms, policy.active, location, directory=registry) as scope:
            again = reencrypt_batch(hostile, reader, scope, policy, location, contract=contract)
        assert again.batch.equals(hostile)


def test_library_a_column_shadowing_a_contract_column_by_case_is_never_clear_data(tmp_path):
    from keyturn.arrow_codec import decrypt_batch
    from keyturn.policy import ReadStatus
    from keyturn.reader import DekReader

    registry, kms, plain, contract, location, policy, sealed = _sealed_lib(tmp_path)
    shadow = pa.array([f"{FORGED_MARK}{i}" for i in range(sealed.num_rows)])
    hostile = pa.RecordBatch.from_arrays([*sealed.columns, shadow], names=[*sealed.schema.names, "SSN"])
    with DekReader(kms, directory=registry) as reader:
        result = decrypt_batch(hostile, reader, policy, location, contract=contract)
    assert "SSN" not in result.plain.schema.names
    assert set(result.status) == {ReadStatus.CORRUPT}  # every row carries a value there
    assert FORGED_MARK not in str(result.plain.to_pylist())
