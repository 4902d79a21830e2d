"""Audit events (deterministic ids, Avro round trips) and the hash-chained log."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fastavro
import pytest

from keyturn.audit import (
    AuditAction,
    AuditChain,
    AuditEvent,
    MismatchReason,
    QuarantineRecord,
    VersionMismatchEvent,
    build_event,
    build_mismatch,
    build_quarantine,
    entry_hash,
    verify_chain,
)
from keyturn.errors import AuditChainError
from keyturn.schemas import load_schema, schema_names

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def fixed_clock(moment: datetime = T0):
    return lambda: moment


def event_kwargs(**overrides):
    kwargs = dict(
        actor="svc-ingest",
        reason="nightly ingest",
        dataset="sales",
        partition="dt=2025-03-01",
        version_from=None,
        version_to=3,
        counts={"rows": 1000, "cells": 4000, "deks": 1, "bytes": 123456},
        kms_request_ids=("req-1",),
        scope_key="sha256:abc",
        clock=fixed_clock(),
    )
    kwargs.update(overrides)
    return kwargs


def make_event(action=AuditAction.ENCRYPT, **overrides) -> AuditEvent:
    return build_event(action, **event_kwargs(**overrides))


# ------------------------------------------------------------------ event ids


def test_same_inputs_same_id():
    assert make_event().event_id == make_event().event_id
    assert make_event() == make_event()
    assert len(make_event().event_id) == 32
    int(make_event().event_id, 16)


def test_event_id_known_answer():
    # Pins the id scheme: changing it would break dedup of events already written.
    assert make_event().event_id == KNOWN_EVENT_ID


KNOWN_EVENT_ID = "a7f81e7b4353362441cc4cf9e63b8e54"


@pytest.mark.parametrize(
    "action, overrides",
    [
        pytest.param(AuditAction.DECRYPT, {}, id="action"),
        pytest.param(AuditAction.ENCRYPT, {"dataset": "sales2"}, id="dataset"),
        pytest.param(AuditAction.ENCRYPT, {"partition": "dt=2025-03-02"}, id="partition"),
        pytest.param(AuditAction.ENCRYPT, {"partition": ""}, id="partition-empty"),
        pytest.param(AuditAction.ENCRYPT, {"version_from": 3}, id="version_from"),
        pytest.param(AuditAction.ENCRYPT, {"version_to": 4}, id="version_to"),
        pytest.param(AuditAction.ENCRYPT, {"version_to": None}, id="version_to-none"),
        pytest.param(AuditAction.ENCRYPT, {"version_from": 3, "version_to": None}, id="versions-swapped"),
        pytest.param(AuditAction.ENCRYPT, {"counts": {"rows": 1001, "cells": 4000, "deks": 1, "bytes": 123456}}, id="count-value"),
        pytest.param(AuditAction.ENCRYPT, {"counts": {"rows": 1000, "cells": 4000, "deks": 1}}, id="count-dropped"),
        pytest.param(AuditAction.ENCRYPT, {"counts": {"rows": 1000, "cellz": 4000, "deks": 1, "bytes": 123456}}, id="count-name"),
        pytest.param(AuditAction.ENCRYPT, {"scope_key": "sha256:abd"}, id="scope_key"),
    ],
)
def test_content_changes_id(action, overrides):
    assert build_event(action, **event_kwargs(**overrides)).event_id != make_event().event_id


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"clock": fixed_clock(T0 + timedelta(hours=5))}, id="time"),
        pytest.param({"actor": "someone-else"}, id="actor"),
        pytest.param({"reason": "retry"}, id="reason"),
        pytest.param({"kms_request_ids": ("req-2", "req-3")}, id="kms_request_ids"),
        pytest.param({"counts": {"bytes": 123456, "deks": 1, "cells": 4000, "rows": 1000}}, id="counts-order"),
    ],
)
def test_incidental_fields_keep_id(overrides):
    other = make_event(**overrides)
    assert other.event_id == make_event().event_id


def test_no_delimiter_collisions():
    a = make_event(dataset="ab", partition="c")
    b = make_event(dataset="a", partition="bc")
    assert a.event_id != b.event_id


def test_mismatch_ids_deterministic():
    kw = dict(dataset="sales", partition="p1", found_version=1, current_version=3, rows=10, scope_key="s", clock=fixed_clock())
    base = build_mismatch("stale", **kw)
    assert base.event_id == build_mismatch(MismatchReason.STALE, **{**kw, "clock": fixed_clock(T0 + timedelta(days=1))}).event_id
    assert base.event_id != build_mismatch("retired", **kw).event_id
    assert base.event_id != build_mismatch("stale", **{**kw, "found_version": 2}).event_id
    assert base.event_id != build_mismatch("stale", **{**kw, "rows": 11}).event_id
    assert base.event_id != build_mismatch("stale", **{**kw, "scope_key": "t"}).event_id


def test_audit_and_mismatch_ids_are_domain_separated():
    # Same strings in every slot must not make the two kinds of id collide.
    a = build_event("encrypt", **event_kwargs(counts={}, version_from=None, version_to=None))
    m = build_mismatch("missing", dataset="sales", partition="dt=2025-03-01", found_version=None, current_version=1,
                       rows=0, scope_key="sha256:abc", clock=fixed_clock())
    assert a.event_id != m.event_id


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, error",
    [
        pytest.param({"counts": {"rows": -1}}, ValueError, id="negative-count"),
        pytest.param({"counts": {"rows": True}}, TypeError, id="bool-count"),
        pytest.param({"counts": {"rows": 1.5}}, TypeError, id="float-count"),
        pytest.param({"counts": {"": 1}}, ValueError, id="empty-count-name"),
        pytest.param({"counts": {1: 1}}, TypeError, id="int-count-name"),
        pytest.param({"counts": [("rows", 1)]}, TypeError, id="counts-not-mapping"),
        pytest.param({"dataset": b"sales"}, TypeError, id="bytes-dataset"),
        pytest.param({"dataset": ""}, ValueError, id="empty-dataset"),
        pytest.param({"partition": None}, TypeError, id="none-partition"),
        pytest.param({"actor": ""}, ValueError, id="empty-actor"),
        pytest.param({"scope_key": ""}, ValueError, id="empty-scope-key"),
        pytest.param({"version_to": -1}, ValueError, id="negative-version"),
        pytest.param({"version_to": "3"}, TypeError, id="str-version"),
        pytest.param({"kms_request_ids": "req-1"}, TypeError, id="ids-single-str"),
        pytest.param({"kms_request_ids": ("req", 5)}, TypeError, id="ids-non-str"),
        pytest.param({"clock": lambda: datetime(2025, 1, 1)}, ValueError, id="naive-clock"),
    ],
)
def test_build_event_rejects(overrides, error):
    with pytest.raises(error):
        make_event(**overrides)


def test_unknown_action_rejected():
    with pytest.raises(ValueError):
        make_event("explode")


def test_mismatch_rules():
    kw = dict(dataset="d", partition="p", current_version=3, rows=1, scope_key="s", clock=fixed_clock())
    with pytest.raises(ValueError, match="missing"):
        build_mismatch("missing", found_version=2, **kw)
    with pytest.raises(ValueError, match="missing"):
        build_mismatch("unknown", found_version=None, **kw)
    with pytest.raises(ValueError, match="older"):
        build_mismatch("stale", found_version=3, **kw)


def test_quarantine_validation_and_repr():
    kw = dict(dataset="d", partition="p", detail="bad tag", payload=b"\x00" * 64, payload_format="raw", rows=2,
              clock=fixed_clock())
    record = build_quarantine("corrupt", **kw)
    assert "payload=" not in repr(record)
    with pytest.raises(ValueError):
        build_quarantine("Corrupt data!", **kw)
    with pytest.raises(ValueError):
        build_quarantine("corrupt", **{**kw, "payload_format": "parquet"})
    with pytest.raises(TypeError):
        build_quarantine("corrupt", **{**kw, "payload": "text"})
    with pytest.raises(ValueError):
        build_quarantine("corrupt", **{**kw, "detail": "x" * 2000})


def test_from_dict_is_strict():
    d = make_event().to_dict()
    with pytest.raises(ValueError, match="unexpected"):
        AuditEvent.from_dict({**d, "secret": "x"})
    del d["actor"]
    with pytest.raises(ValueError, match="missing"):
        AuditEvent.from_dict(d)


# --------------------------------------------------------- Avro and round trips


def sample_events():
    return [
        pytest.param("audit_event", AuditEvent, make_event(), id="audit-encrypt"),
        pytest.param(
            "audit_event",
            AuditEvent,
            make_event(AuditAction.ROTATE, partition="", version_from=2, version_to=3, counts={}, kms_request_ids=()),
            id="audit-rotate-control-plane",
        ),
        pytest.param(
            "audit_event",
            AuditEvent,
            make_event(AuditAction.SCHEDULE_DELETION, version_from=1, version_to=None, counts={"deks": 2**40}),
            id="audit-big-count",
        ),
        pytest.param(
            "version_mismatch",
            VersionMismatchEvent,
            build_mismatch("stale", dataset="d", partition="p", found_version=1, current_version=2**32 - 1, rows=7,
                           scope_key="s", clock=fixed_clock()),
            id="mismatch-stale",
        ),
        pytest.param(
            "version_mismatch",
            VersionMismatchEvent,
            build_mismatch("missing", dataset="d", partition="p", found_version=None, current_version=2, rows=7,
                           scope_key="s", clock=fixed_clock()),
            id="mismatch-missing",
        ),
        pytest.param(
            "quarantine_record",
            QuarantineRecord,
            build_quarantine("unknown_version", dataset="d", partition="p", detail="version 9 not in registry",
                             payload=bytes(range(256)), payload_format="arrow_ipc", rows=3, clock=fixed_clock()),
            id="quarantine-arrow",
        ),
        pytest.param(
            "quarantine_record",
            QuarantineRecord,
            build_quarantine("unparseable", dataset="d", partition="", detail="", payload=b"", payload_format="raw",
                             rows=0, clock=fixed_clock()),
            id="quarantine-empty",
        ),
    ]


@pytest.mark.parametrize("schema_name, cls, event", sample_events())
def test_avro_round_trip(schema_name, cls, event):
    schema = load_schema(schema_name)
    as_dict = event.to_dict()
    assert [f["name"] for f in schema["fields"]] == list(as_dict)
    assert schema["name"] == f"io.keyturn.{cls.__name__}"
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, as_dict)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, schema, None)
    assert read == as_dict
    assert cls.from_dict(read) == event
    assert pickle.loads(pickle.dumps(event)) == event
    hash(event)


def test_schema_enums_match_python():
    audit = load_schema("audit_event")
    action = next(f for f in audit["fields"] if f["name"] == "action")["type"]
    assert action["symbols"] == [a.value for a in AuditAction]
    mismatch = load_schema("version_mismatch.avsc")
    reason = next(f for f in mismatch["fields"] if f["name"] == "reason")["type"]
    assert reason["symbols"] == [r.value for r in MismatchReason]


def test_load_schema_rejects_bad_names():
    assert {"audit_event", "version_mismatch", "quarantine_record"} <= set(schema_names())
    with pytest.raises(ValueError, match="available"):
        load_schema("nope")
    with pytest.raises(ValueError):
        load_schema("../pyproject")


# ------------------------------------------------------------------ the chain


def control_event(i: int, scope: str = "s") -> AuditEvent:
    return make_event(AuditAction.ROTATE, partition="", version_from=i, version_to=i + 1, counts={},
                      scope_key=f"{scope}-{i}", clock=fixed_clock(T0 + timedelta(minutes=i)))


@pytest.fixture(scope="module")
def chain20(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chain") / "audit.jsonl"
    chain = AuditChain(path)
    for i in range(20):
        assert chain.append(control_event(i)) == i
    return path


@pytest.fixture
def chain_copy(chain20, tmp_path) -> Path:
    path = tmp_path / "audit.jsonl"
    shutil.copy(chain20, path)
    shutil.copy(str(chain20) + ".head", str(path) + ".head")
    return path


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_chain_verifies(chain_copy):
    chain = AuditChain(chain_copy)
    assert verify_chain(chain_copy) == 20
    entries = chain.entries()
    assert [e.seq for e in entries] == list(range(20))
    assert entries[5].event == control_event(5)
    seq, head = chain.head()
    assert seq == 19 and head == entries[-1].hash
    assert verify_chain(chain_copy, expected_head=head) == 20
    assert verify_chain(chain_copy, expected_head=entries[10].hash) == 20  # an older recorded head is a prefix
    first = json.loads(read_lines(chain_copy)[0])
    assert first["prev"] == "0" * 64
    assert first["hash"] == entry_hash(0, first["prev"], first["event"])


def edit_one_char(path):
    lines = read_lines(path)
    lines[7] = lines[7].replace(b'"actor":"svc-ingest"', b'"actor":"svc-ingesT"')
    write_lines(path, lines)
    return 7


def delete_middle(path):
    lines = read_lines(path)
    del lines[10]
    write_lines(path, lines)
    return 10


def insert_copied_line(path):
    lines = read_lines(path)
    lines.insert(10, lines[3])
    write_lines(path, lines)
    return 10


def insert_forged_line(path):
    # A well-formed forgery (right seq, prev and hash) is noticed at the next line.
    lines = read_lines(path)
    prev = json.loads(lines[9])["hash"]
    event = control_event(99, scope="forged").to_dict()
    forged = {"seq": 10, "prev": prev, "event": event, "hash": entry_hash(10, prev, event)}
    lines.insert(10, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    write_lines(path, lines)
    return 11


def swap_two(path):
    lines = read_lines(path)
    lines[4], lines[12] = lines[12], lines[4]
    write_lines(path, lines)
    return 4


def truncate_mid_line(path):
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + (len(data) - last_start) // 2])
    return 19


def truncate_in_middle_of_file(path):
    lines = read_lines(path)
    write_lines(path, lines[:15] + [lines[15][:40]])
    return 15


def duplicate_line(path):
    lines = read_lines(path)
    lines.insert(7, lines[6])
    write_lines(path, lines)
    return 7


def delete_last_line(path):
    write_lines(path, read_lines(path)[:-1])
    return 19


def delete_last_three_lines(path):
    write_lines(path, read_lines(path)[:-3])
    return 17


def rewrite_from_middle(path):
    # Rebuild a fully consistent chain that differs from entry 12 on; the sidecar catches it.
    lines = read_lines(path)[:12]
    prev = json.loads(lines[-1])["hash"]
    for seq in range(12, 20):
        event = control_event(seq, scope="rewritten").to_dict()
        digest = entry_hash(seq, prev, event)
        lines.append(json.dumps({"seq": seq, "prev": prev, "event": event, "hash": digest},
                                sort_keys=True, separators=(",", ":")).encode() + b"\n")
        prev = digest
    write_lines(path, lines)
    return 19


TAMPERS = [
    pytest.param(edit_one_char, id="edit-one-char"),
    pytest.param(delete_middle, id="delete-middle-line"),
    pytest.param(insert_copied_line, id="insert-copied-line"),
    pytest.param(insert_forged_line, id="insert-forged-line"),
    pytest.param(swap_two, id="swap-two-lines"),
    pytest.param(truncate_mid_line, id="truncate-last-line-mid-line"),
    pytest.param(truncate_in_middle_of_file, id="truncate-mid-file"),
    pytest.param(duplicate_line, id="duplicate-line"),
    pytest.param(delete_last_line, id="delete-last-line-sidecar"),
    pytest.param(delete_last_three_lines, id="delete-last-3-lines-sidecar"),
    pytest.param(rewrite_from_middle, id="rewrite-tail-sidecar"),
]


@pytest.mark.parametrize("tamper", TAMPERS)
def test_tamper_detected(chain_copy, tamper):
    expected_index = tamper(chain_copy)
    with pytest.raises(AuditChainError) as info:
        verify_chain(chain_copy)
    assert info.value.index == expected_index, info.value.problem
    with pytest.raises(AuditChainError):
        AuditChain(chain_copy).entries()


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(truncate_mid_line, id="truncate-last-line-mid-line"),
        pytest.param(truncate_in_middle_of_file, id="truncate-mid-file"),
        pytest.param(delete_last_line, id="delete-last-line"),
        pytest.param(delete_last_three_lines, id="delete-last-3-lines"),
        pytest.param(rewrite_from_middle, id="rewrite-tail"),
    ],
)
def test_append_refuses_damaged_tail(chain_copy, tamper):
    # Appending would otherwise rewrite the sidecar and hide the damage.
    tamper(chain_copy)
    before = chain_copy.read_bytes(), Path(str(chain_copy) + ".head").read_bytes()
    with pytest.raises(AuditChainError, match="refusing to append"):
        AuditChain(chain_copy).append(control_event(50))
    assert (chain_copy.read_bytes(), Path(str(chain_copy) + ".head").read_bytes()) == before


def test_delete_last_line_caught_by_expected_head(chain_copy):
    _, head = AuditChain(chain_copy).head()
    delete_last_line(chain_copy)
    os.unlink(str(chain_copy) + ".head")  # the attacker removed the sidecar too
    assert verify_chain(chain_copy) == 19  # undetectable from the file alone...
    with pytest.raises(AuditChainError) as info:
        verify_chain(chain_copy, expected_head=head)  # ...but not against a recorded head
    assert info.value.index == 19


def test_crash_between_line_and_sidecar_is_tolerated(chain_copy):
    chain = AuditChain(chain_copy)
    stale_sidecar = Path(str(chain_copy) + ".head").read_bytes()
    chain.append(control_event(20))
    Path(str(chain_copy) + ".head").write_bytes(stale_sidecar)  # as if we crashed before replacing it
    assert verify_chain(chain_copy) == 21
    assert chain.append(control_event(21)) == 21
    assert verify_chain(chain_copy) == 22


def test_missing_log_with_sidecar_is_tampering(chain_copy):
    os.unlink(chain_copy)
    with pytest.raises(AuditChainError):
        verify_chain(chain_copy)
    with pytest.raises(AuditChainError):
        AuditChain(chain_copy).entries()


def test_empty_chain(tmp_path):
    chain = AuditChain(tmp_path / "new.jsonl")
    assert chain.entries() == [] and chain.head() is None
    with pytest.raises(FileNotFoundError):
        verify_chain(tmp_path / "new.jsonl")
    with pytest.raises(TypeError):
        chain.append(control_event(0).to_dict())


def _append_worker(path: str, worker: int, count: int) -> None:
    chain = AuditChain(path)
    for i in range(count):
        chain.append(control_event(i, scope=f"w{worker}"))


def test_concurrent_appends_from_processes(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert verify_chain(path) == 100
    entries = AuditChain(path).entries()
    assert len({e.event.event_id for e in entries}) == 100
    assert sorted(e.event.scope_key for e in entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
