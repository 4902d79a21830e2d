"""The lifecycle settings do what docs/config.example.yaml says.

- ``key_hierarchy.transition_window_days``: `retire` is refused (exit 5, one
  line naming the date it becomes allowed) while the version left the active
  state less than N days ago, by the registry's ``state_changed_at``.
- ``version_tracking.on_missing_version`` / ``on_unknown_version``:
  ``quarantine`` routes such rows to the version-mismatch side output;
  ``reject`` raises `VersionMismatchError` (exit code 3).
- ``lifecycle.reencryption_strategy``: ``eager`` (`rotate` re-wraps the whole
  DEK directory), ``lazy`` (readers re-wrap the stale DEKs they read),
  ``batch_lazy`` (nothing moves until a bounded job runs).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from beam_support import (
    BATCH_RUNNER,
    DATASET,
    encrypt_direct,
    encrypt_with_beam,
    keyed_batches,
    open_registry,
    rotate,
    sample_batch,
    with_version,
)
from cli_support import customers, run_cli, snapshot, write_encrypted_file
from keyturn.arrow_codec import decrypt_batch
from keyturn.audit.chain import AuditChain
from keyturn.errors import InvalidTransitionError, VersionMismatchError
from keyturn.policy import KeyPolicy, ReadStatus, VersionRules
from keyturn.reader import DekReader
from keyturn.registry.base import KeyState
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rotation import check_transition_window, retire, retire_allowed_at
from keyturn.scope import Location
from keyturn.pipelines import exitcodes
from keyturn.home import KeyHome
from keyturn.transforms.adapters import ArrowAdapter
from keyturn.transforms.arrow import keyturn_pardo
from keyturn.transforms.dofns import DecryptFn

T0 = datetime(2025, 6, 1, tzinfo=timezone.utc)


def at(moment: datetime) -> dict[str, str]:
    return {"KEYTURN_NOW": moment.isoformat()}


def set_config(home_dir: str, section: str, **values) -> None:
    """Change settings in a key home's config.yaml."""
    path = os.path.join(home_dir, "config.yaml")
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.setdefault(section, {}).update(values)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)


def one_line_error(result, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    assert result.err.count("\n") == 1 and result.err.startswith("keyturn: error: "), result.err
    for word in words:
        assert word in result.err, result.err


def new_home(tmp_path, when: datetime = T0, **lifecycle) -> str:
    path = str(tmp_path / "home")
    assert run_cli("--home", path, "init", "--dataset", "customers", env=at(when)).code == 0
    if lifecycle:
        set_config(path, "lifecycle", **lifecycle)
    return path


# ------------------------------------------------------------------ transition_window_days


def test_retire_is_refused_inside_the_transition_window_and_names_the_date(tmp_path):
    home = new_home(tmp_path, T0 - timedelta(days=200))  # version 1 is old; what counts is when it left active
    set_config(home, "key_hierarchy", transition_window_days=30)
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0

    early = run_cli("--home", home, "retire", "1", env=at(T0 + timedelta(days=29, hours=23)))
    one_line_error(early, exitcodes.REFUSED, "2025-07-01 00:00 UTC", "transition_window_days", "version 1")
    assert KeyHome.open(home).registry().get(1).state is KeyState.DECRYPT_ONLY
    as_json = run_cli("--home", home, "--json", "retire", "1", env=at(T0 + timedelta(days=1)))
    assert as_json.code == exitcodes.REFUSED
    assert as_json.json()["error_type"] == "InvalidTransitionError"

    done = run_cli("--home", home, "--json", "retire", "1", env=at(T0 + timedelta(days=30)))
    assert done.code == 0, done.err
    assert done.json()["state"] == "retired"
    actions = [e.event.action.value for e in KeyHome.open(home).chain().entries()]
    assert actions == ["rotate", "rotate", "retire"]  # the refusals logged nothing


def test_transition_window_is_checked_before_any_lake_is_read(tmp_path):
    home = new_home(tmp_path)
    set_config(home, "key_hierarchy", transition_window_days=7)
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    refused = run_cli("--home", home, "retire", "1", "--lake", str(tmp_path / "no-such-lake"), env=at(T0))
    one_line_error(refused, exitcodes.REFUSED, "2025-06-08 00:00 UTC")


def test_default_window_is_zero_so_retire_follows_the_directory_alone(tmp_path):
    home = new_home(tmp_path)
    assert KeyHome.open(home).config.key_hierarchy.transition_window_days == 0
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    assert run_cli("--home", home, "retire", "1", env=at(T0)).code == 0


def test_window_does_not_hide_the_other_refusals(tmp_path):
    home = new_home(tmp_path)
    set_config(home, "key_hierarchy", transition_window_days=30)
    write_encrypted_file(KeyHome.open(home), str(tmp_path / "lake"), "region=0", customers(5))
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    one_line_error(run_cli("--home", home, "retire", "2", env=at(T0)), exitcodes.REFUSED, "active")
    one_line_error(run_cli("--home", home, "retire", "9", env=at(T0)), exitcodes.USAGE, "9")
    # past the window, the DEK directory still decides
    one_line_error(run_cli("--home", home, "retire", "1", env=at(T0 + timedelta(days=31))), exitcodes.REFUSED, "DEK")


def test_core_retire_takes_the_window_and_an_injected_clock(tmp_path):
    clock = [T0]
    registry = SqliteKeyRegistry(str(tmp_path / "r.sqlite"), clock=lambda: clock[0])
    registry.initialize("kek-1", actor="t", reason="t")
    registry.rotate("kek-2", actor="t", reason="t")
    chain = AuditChain(str(tmp_path / "audit.log"))
    v1 = registry.get(1)
    assert retire_allowed_at(v1, 10) == T0 + timedelta(days=10)
    assert retire_allowed_at(v1, 0) is None  # no window: the directory alone decides, whatever the clock says
    check_transition_window(registry, 1, 0, T0 - timedelta(days=365))
    assert retire_allowed_at(registry.get(2), 10) is None  # active: the registry refuses it on its own
    clock[0] = T0 + timedelta(days=9)
    with pytest.raises(InvalidTransitionError, match="2025-06-11 00:00 UTC"):
        retire(registry, 1, chain, actor="t", reason="t", clock=lambda: clock[0], transition_window_days=10)
    with pytest.raises(InvalidTransitionError):
        check_transition_window(registry, 1, 10, clock[0])
    clock[0] = T0 + timedelta(days=10)
    assert retire(registry, 1, chain, actor="t", reason="t", clock=lambda: clock[0], transition_window_days=10).state is KeyState.RETIRED


# ------------------------------------------------------------------ on_missing_version / on_unknown_version


def test_version_rules_core_quarantine_counts_and_reject_raises(tmp_path):
    from beam_support import build_key_home

    source = build_key_home(tmp_path / "keys")
    sealed = encrypt_direct(source, sample_batch(6), "eu", version=1)
    missing = with_version(sealed, None)  # envelope kept, version metadata gone
    unknown = encrypt_direct(source, sample_batch(4), "eu", version=7)  # a version the registry never had
    policy = KeyPolicy.from_registry(open_registry(source))
    with source.open_kms() as kms, DekReader(kms) as reader:
        counts_missing = decrypt_batch(missing, reader, policy, Location(DATASET, "eu")).counts()
        counts_unknown = decrypt_batch(unknown, reader, policy, Location(DATASET, "eu")).counts()
    assert counts_missing["missing"] == 6 and counts_unknown["unknown"] == 4

    VersionRules().check(counts_missing)  # quarantine (the default): the reader routes them, nothing raised
    VersionRules(on_missing="reject").check(counts_unknown)  # each rule covers its own status only
    with pytest.raises(VersionMismatchError, match="on_missing_version: reject") as info:
        VersionRules(on_missing="reject").check(counts_missing, dataset=DATASET, partition="eu")
    assert (info.value.reason, info.value.rows) == ("missing", 6)
    with pytest.raises(VersionMismatchError, match="on_unknown_version: reject"):
        VersionRules(on_unknown="reject").check([ReadStatus.CURRENT, ReadStatus.UNKNOWN])
    with pytest.raises(ValueError):
        VersionRules(on_unknown="drop")
    assert exitcodes.exit_code_for(VersionMismatchError("x")) == exitcodes.DATA == 3


def _decrypt_with_fn(elements, fn, *, keyturn_counters=False):
    """Run `fn` (a DecryptFn) over `elements`; return (main row count, mismatch reasons) through counters,
    and with `keyturn_counters` the DoFn's own counters too (as ``keyturn.<name>``)."""
    from apache_beam.metrics import Metrics

    class Count(beam.DoFn):
        def __init__(self, name):
            self.name = name

        def process(self, element):
            n = element[1].num_rows
            Metrics.counter("test", self.name).inc(n)
            yield element

    class Reasons(beam.DoFn):
        def process(self, element):
            event, rows = element
            Metrics.counter("test", f"mismatch_{event['reason']}").inc(rows.num_rows)
            yield element

    p = beam.Pipeline(runner=BATCH_RUNNER)
    keyed = Tuple[str, pa.RecordBatch]
    out = p | beam.Create(elements).with_output_types(keyed) | keyturn_pardo(fn, keyed, Tuple[Dict[str, Any], pa.RecordBatch])
    _ = out.main | "CountMain" >> beam.ParDo(Count("main"))
    _ = out.version_mismatch | "CountMismatch" >> beam.ParDo(Reasons())
    result = p.run()
    result.wait_until_finish()
    from apache_beam.metrics.metric import MetricsFilter

    got: dict[str, int] = {}
    for namespace, prefix in (("test", ""), ("keyturn", "keyturn.")) if keyturn_counters else (("test", ""),):
        for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
            key = prefix + c.key.metric.name
            got[key] = got.get(key, 0) + c.committed
    return got


@pytest.mark.beam
def test_decrypt_fn_quarantines_or_rejects_unknown_and_missing_rows(tmp_path):
    from beam_support import build_key_home

    source = build_key_home(tmp_path / "keys")
    good = encrypt_with_beam(source, keyed_batches(["eu"], 1, 5), tmp_path / "enc")
    unknown = ("eu", encrypt_direct(source, sample_batch(3, start=100), "eu", version=7))
    missing = ("eu", with_version(good[0][1], None))
    fn = lambda **rules: DecryptFn(  # noqa: E731
        ArrowAdapter(), source, DATASET, stale_to_main=True, actor="t", reason="t", version_rules=VersionRules(**rules)
    )

    quarantined = _decrypt_with_fn(good + [unknown, missing], fn())
    assert quarantined == {"main": 5, "mismatch_unknown": 3, "mismatch_missing": 5}
    assert _decrypt_with_fn(good + [missing], fn(on_unknown="reject"))["mismatch_missing"] == 5
    with pytest.raises(VersionMismatchError, match="unknown"):
        _decrypt_with_fn(good + [unknown], fn(on_unknown="reject"))
    with pytest.raises(VersionMismatchError, match="missing"):
        _decrypt_with_fn(good + [missing], fn(on_missing="reject"))


def write_unregistered_file(home: KeyHome, lake_dir: str, partition: str, rows: int) -> None:
    """A lake file under the active version whose DEK the home's directory never registered (rows read `unknown`)."""
    from keyturn.arrow_codec import encrypt_batch
    from keyturn.lake import Lake, footer_for, write_parquet_atomically
    from keyturn.lake.footer import dek_counts
    from keyturn.scope import DekScope

    policy = home.policy()
    with home.kms() as kms, DekScope(kms, policy.active, Location(home.dataset, partition)) as scope:
        sealed = encrypt_batch(customers(rows, start=1000), ["email"], scope)
    lake = Lake(lake_dir)
    path = lake.path(partition, "part-unregistered.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    footer = footer_for(home.dataset, partition, {policy.active.version: rows}, rows, ["email"], dek_counts(sealed))
    write_parquet_atomically(lake, path, pa.Table.from_batches([sealed]), footer)


def _plain_files(out: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found += [os.path.join(root, f) for f in files if f.endswith(".parquet")]
    return found


@pytest.mark.beam
def test_cli_decrypt_quarantines_unknown_rows_by_default_and_rejects_them_when_told(tmp_path):
    home = new_home(tmp_path)
    lake = str(tmp_path / "lake")
    write_encrypted_file(KeyHome.open(home), lake, "region=0", customers(8))
    write_unregistered_file(KeyHome.open(home), lake, "region=1", 3)

    quarantine = run_cli("--home", home, "--json", "decrypt", "--lake", lake, "--out", str(tmp_path / "q"))
    assert quarantine.code == exitcodes.DATA, quarantine.err
    report = quarantine.json()
    assert (report["rows_written"], report["rows_by_status"]["unknown"]) == (8, 3)

    set_config(home, "version_tracking", on_unknown_version="reject")
    rejected = run_cli("--home", home, "decrypt", "--lake", lake, "--out", str(tmp_path / "r"))
    one_line_error(rejected, exitcodes.DATA, "3 unknown row(s)", "on_unknown_version: reject")
    assert _plain_files(str(tmp_path / "r")) == []  # a rejected run leaves no plain output behind
    as_json = run_cli("--home", home, "--json", "decrypt", "--lake", lake, "--out", str(tmp_path / "r2"))
    assert as_json.json()["error_type"] == "VersionMismatchError" and as_json.json()["exit_code"] == 3

    set_config(home, "version_tracking", on_unknown_version="quarantine", on_missing_version="reject")
    only_missing_rejected = run_cli("--home", home, "--json", "decrypt", "--lake", lake, "--out", str(tmp_path / "m"))
    assert only_missing_rejected.code == exitcodes.DATA and only_missing_rejected.json()["rows_written"] == 8


# ------------------------------------------------------------------ reencryption_strategy


def _encrypted_lake(tmp_path, **lifecycle) -> tuple[str, str]:
    home = new_home(tmp_path, **lifecycle)
    lake = str(tmp_path / "lake")
    for part in range(3):
        write_encrypted_file(KeyHome.open(home), lake, f"region={part}", customers(4, start=10 * part))
    return home, lake


def _data_files(lake: str) -> dict[str, tuple[int, int]]:
    """`snapshot` of the lake's data files (a reader may create the lake's lock file under `_keyturn/`)."""
    return {path: stat for path, stat in snapshot(lake).items() if not path.startswith("_keyturn/")}


def _deks(home: str) -> dict[int, int]:
    return dict(KeyHome.open(home).registry().deks_by_version())


def test_eager_rotate_rewraps_the_whole_directory_at_once(tmp_path):
    home, lake = _encrypted_lake(tmp_path, reencryption_strategy="eager")
    before = snapshot(lake)
    rotated = run_cli("--home", home, "--json", "rotate", env=at(T0))
    assert rotated.code == 0, rotated.err
    report = rotated.json()
    assert report["reencryption_strategy"] == "eager"
    assert report["rewrap"]["deks_moved"] == 3 and report["rewrap"]["complete"]
    assert _deks(home).get(1, 0) == 0 and _deks(home)[2] == 3
    assert snapshot(lake) == before  # 0 lake bytes
    assert run_cli("--home", home, "retire", "1", env=at(T0)).code == 0


@pytest.mark.parametrize("strategy", ["batch_lazy", "lazy"])
def test_lazy_strategies_rotate_without_moving_any_dek(tmp_path, strategy):
    home, _ = _encrypted_lake(tmp_path, reencryption_strategy=strategy)
    rotated = run_cli("--home", home, "--json", "rotate", env=at(T0))
    assert rotated.code == 0, rotated.err
    assert rotated.json()["rewrap"] is None
    assert _deks(home) == {1: 3}
    text = run_cli("--home", home, "rotate", env=at(T0)).out
    assert ("readers re-wrap" in text) is (strategy == "lazy")


def test_batch_lazy_moves_deks_only_in_bounded_explicit_jobs(tmp_path):
    home, lake = _encrypted_lake(tmp_path)  # batch_lazy is the default
    assert KeyHome.open(home).config.lifecycle.reencryption_strategy == "batch_lazy"
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    assert _deks(home) == {1: 3}
    bounded = run_cli("--home", home, "--json", "rewrap", "--max-deks", "1", env=at(T0))
    assert bounded.json()["deks_moved"] == 1
    assert _deks(home) == {1: 2, 2: 1}


@pytest.mark.beam
def test_a_kms_outage_in_the_lazy_rewrap_counts_only_the_deks_it_did_not_move(tmp_path, monkeypatch):
    from beam_support import build_key_home

    import keyturn.transforms.dofns as dofns
    from keyturn.errors import KmsUnavailableError

    real = dofns.rewrap_entries

    def moves_then_fails(directory, kms, entries, target, *, result):
        real(directory, kms, list(entries), target, result=result)  # the DEK moves, then the KMS goes down
        raise KmsUnavailableError("the KMS is down")

    source = build_key_home(tmp_path / "keys")
    encrypted = encrypt_with_beam(source, keyed_batches(["eu"], 1, 5), tmp_path / "enc")
    rotate(source)
    monkeypatch.setattr(dofns, "rewrap_entries", moves_then_fails)
    fn = DecryptFn(ArrowAdapter(), source, DATASET, stale_to_main=True, actor="t", reason="t", rewrap_stale=True)
    got = _decrypt_with_fn(encrypted, fn, keyturn_counters=True)
    assert got["main"] == 5  # the read never fails for the rewrap
    assert dict(open_registry(source).deks_by_version()) == {2: 1}
    assert (got.get("keyturn.deks_rewrapped", 0), got.get("keyturn.rewrap_errors", 0)) == (1, 0)  # the old code: (0, 1)


@pytest.mark.beam
@pytest.mark.parametrize("rewrap_stale", [True, False], ids=["lazy", "batch_lazy"])
def test_decrypt_fn_rewraps_the_stale_deks_it_reads_only_when_lazy(tmp_path, rewrap_stale):
    from beam_support import build_key_home

    source = build_key_home(tmp_path / "keys")
    encrypted = encrypt_with_beam(source, keyed_batches(["eu", "us"], 1, 5), tmp_path / "enc")
    registry = open_registry(source)
    before = dict(registry.deks_by_version())
    assert before == {1: 2}
    rotate(source)
    fn = DecryptFn(ArrowAdapter(), source, DATASET, stale_to_main=True, actor="t", reason="t", rewrap_stale=rewrap_stale)
    got = _decrypt_with_fn([e for e in encrypted if e[0] == "eu"], fn)
    assert got["main"] == 5 and got["mismatch_stale"] == 5  # the rows read were stale, and were decrypted
    after = dict(open_registry(source).deks_by_version())
    # lazy: only the DEK read ("eu") moved, "us" waits to be read; batch_lazy: nothing moved
    assert after == ({1: 1, 2: 1} if rewrap_stale else {1: 2})
    again = _decrypt_with_fn([e for e in encrypted if e[0] == "eu"], fn)
    assert again.get("mismatch_stale", 0) == (0 if rewrap_stale else 5)  # now current by the directory


@pytest.mark.beam
def test_cli_decrypt_rewraps_what_it_reads_under_lazy_and_writes_no_lake_byte(tmp_path):
    home, lake = _encrypted_lake(tmp_path, reencryption_strategy="lazy")
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    before = _data_files(lake)
    out = run_cli("--home", home, "--json", "decrypt", "--lake", lake, "--out", str(tmp_path / "plain"))
    assert out.code == 0, out.err
    assert out.json()["rows_written"] == 12
    assert out.json()["deks_rewrapped"] == 3
    assert _deks(home).get(1, 0) == 0 and _deks(home)[2] == 3
    assert _data_files(lake) == before  # 0 lake bytes: only the directory changed
    assert run_cli("--home", home, "retire", "1", env=at(T0)).code == 0


@pytest.mark.beam
def test_cli_decrypt_moves_nothing_under_batch_lazy(tmp_path):
    home, lake = _encrypted_lake(tmp_path)
    assert run_cli("--home", home, "rotate", env=at(T0)).code == 0
    out = run_cli("--home", home, "--json", "decrypt", "--lake", lake, "--out", str(tmp_path / "plain"))
    assert out.code == 0, out.err
    assert _deks(home) == {1: 3}
