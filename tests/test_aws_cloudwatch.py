"""CloudWatchAuditSink against moto's CloudWatch Logs: delivery, creation, batching, retries, refusals."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from aws_support import AttemptCounter, FaultInjector, client, moto_url, shorten_backoff, unique  # noqa: F401

from keyturn.audit.events import AuditEvent, build_event
from keyturn.aws.cloudwatch_sink import DEFAULT_LOG_STREAM, CloudWatchAuditSink, event_message
from keyturn.errors import AuditSinkError

pytestmark = pytest.mark.aws

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)


def event(i: int, action: str = "encrypt") -> AuditEvent:
    return build_event(
        action,
        actor="tests",
        reason="cloudwatch sink",
        dataset="customers",
        partition=f"region={i % 3}",
        version_from=None,
        version_to=1,
        counts={"rows": 100 + i, "cells": 2 * (100 + i)},
        kms_request_ids=[f"req-{i}"],
        scope_key=f"scope-{i}",
        clock=lambda: T0,
    )


@pytest.fixture
def logs(moto_url):
    return client("logs", moto_url)


def read_back(logs, group: str, stream: str) -> list[dict]:
    events = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)["events"]
    return [json.loads(e["message"]) for e in events]


def test_events_written_are_returned_by_get_log_events(logs):
    group, stream = unique("/keyturn/audit"), "lake-rotation"
    sent = [event(i) for i in range(5)]
    with CloudWatchAuditSink(group, stream, client=logs) as sink:
        for e in sent:
            sink.append(e)
        assert sink.pending == 5  # buffered until the batch fills or the sink flushes
    assert sink.sent == 5 and sink.put_calls == 1
    got = read_back(logs, group, stream)
    assert got == [e.to_dict() for e in sent]
    assert [AuditEvent.from_dict(d) for d in got] == sent


def test_group_and_stream_are_created_or_reused(logs):
    group = unique("/keyturn/audit")
    logs.create_log_group(logGroupName=group)  # an existing group is fine
    with CloudWatchAuditSink(group, client=logs) as sink:
        sink.append(event(1))
    streams = [s["logStreamName"] for s in logs.describe_log_streams(logGroupName=group)["logStreams"]]
    assert streams == [DEFAULT_LOG_STREAM]
    with CloudWatchAuditSink(group, client=logs) as again:  # both exist now
        again.append(event(2))
    assert [d["scope_key"] for d in read_back(logs, group, DEFAULT_LOG_STREAM)] == ["scope-1", "scope-2"]


def test_a_stream_deleted_under_the_sink_is_recreated(logs):
    group, stream = unique("/keyturn/audit"), "s"
    sink = CloudWatchAuditSink(group, stream, client=logs)
    sink.append(event(1))
    sink.flush()
    logs.delete_log_stream(logGroupName=group, logStreamName=stream)
    sink.append(event(2))
    sink.close()
    assert [d["scope_key"] for d in read_back(logs, group, stream)] == ["scope-2"]


def test_batches_by_count(logs):
    group = unique("/keyturn/audit")
    calls = AttemptCounter(logs)
    sink = CloudWatchAuditSink(group, "s", client=logs, max_batch_events=4)
    sink.extend(event(i) for i in range(10))
    assert sink.sent == 8 and sink.pending == 2  # two full batches went out as they filled
    sink.close()
    assert sink.put_calls == 3 and calls.by_operation["PutLogEvents"] == 3
    assert [d["scope_key"] for d in read_back(logs, group, "s")] == [f"scope-{i}" for i in range(10)]


def test_batches_by_size(logs):
    group = unique("/keyturn/audit")
    big = [
        build_event(
            "rewrap",
            actor="tests",
            reason="r" * 200_000,  # ~200 KB per event: five do not fit in one 1 MiB put
            dataset="customers",
            partition="p",
            version_from=1,
            version_to=2,
            counts={"rows": i},
            scope_key=f"big-{i}",
            clock=lambda: T0,
        )
        for i in range(7)
    ]
    with CloudWatchAuditSink(group, "s", client=logs) as sink:
        sink.extend(big)
    assert sink.put_calls == 2 and sink.sent == 7
    assert [d["scope_key"] for d in read_back(logs, group, "s")] == [f"big-{i}" for i in range(7)]


def test_throttled_puts_are_retried_and_delivered_once(moto_url):
    logs = client("logs", moto_url, max_attempts=5)
    shorten_backoff(logs)
    group = unique("/keyturn/audit")
    injector = FaultInjector(logs, code="ThrottlingException", decide=lambda op, i: op == "PutLogEvents" and i % 2 == 0)
    with CloudWatchAuditSink(group, "s", client=logs, max_batch_events=3) as sink:
        sink.extend(event(i) for i in range(9))
    assert injector.injected_by_operation["PutLogEvents"] == 3 and sink.put_calls == 3
    got = read_back(logs, group, "s")
    assert [d["scope_key"] for d in got] == [f"scope-{i}" for i in range(9)]  # each once, in order


def test_failure_after_retries_keeps_events_buffered(moto_url):
    logs = client("logs", moto_url, max_attempts=2)
    shorten_backoff(logs)
    group = unique("/keyturn/audit")
    injector = FaultInjector.always(logs, code="ServiceUnavailableException", status=503, operations={"PutLogEvents"})
    sink = CloudWatchAuditSink(group, "s", client=logs)
    sink.extend(event(i) for i in range(3))
    with pytest.raises(AuditSinkError, match="ServiceUnavailableException"):
        sink.flush()
    assert sink.pending == 3 and injector.injected == 2
    injector.enabled = False
    assert sink.flush() == 3
    sink.close()
    assert len(read_back(logs, group, "s")) == 3


def test_only_audit_events_are_accepted(logs):
    sink = CloudWatchAuditSink(unique("/keyturn/audit"), "s", client=logs)
    good = event(1).to_dict()
    sink.append(good)  # the dict form of an event is fine
    with pytest.raises(ValueError, match="unexpected fields"):
        sink.append({**good, "dek": "00" * 32})  # anything extra (say, a key) is refused
    with pytest.raises(TypeError):
        sink.append("a log line")  # type: ignore[arg-type]
    assert sink.pending == 1
    sink.close()
    with pytest.raises(AuditSinkError, match="closed"):
        sink.append(event(2))


def test_message_is_canonical_json_of_to_dict():
    e = event(3)
    text = event_message(e)
    assert json.loads(text) == e.to_dict()
    assert text == json.dumps(e.to_dict(), sort_keys=True, separators=(",", ":"))


def test_timestamps_come_from_the_sink_clock(logs):
    group = unique("/keyturn/audit")
    now = datetime.now(timezone.utc).timestamp()
    ticks = iter([now - 5, now - 4, now - 3])
    with CloudWatchAuditSink(group, "s", client=logs, clock=lambda: next(ticks)) as sink:
        sink.extend(event(i) for i in range(3))
    stamps = [e["timestamp"] for e in logs.get_log_events(logGroupName=group, logStreamName="s", startFromHead=True)["events"]]
    assert stamps == [int((now - 5 + k) * 1000) for k in range(3)]


def test_constructor_arguments(logs):
    with pytest.raises(ValueError):
        CloudWatchAuditSink("", client=logs)
    with pytest.raises(ValueError):
        CloudWatchAuditSink("g", "bad:stream", client=logs)
    with pytest.raises(ValueError):
        CloudWatchAuditSink("g", client=logs, max_batch_events=0)
    with pytest.raises(ValueError):
        CloudWatchAuditSink("g", client=logs, endpoint_url="http://127.0.0.1:1")
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(CloudWatchAuditSink("g", client=logs))


def test_an_event_appended_while_the_service_fails_is_kept(moto_url):
    logs = client("logs", moto_url, max_attempts=1)
    group = unique("/keyturn/audit")
    sink = CloudWatchAuditSink(group, "s", client=logs, max_batch_events=2)
    sink.append(event(0))
    injector = FaultInjector.always(logs, code="ServiceUnavailableException", status=503, operations={"PutLogEvents"})
    with pytest.raises(AuditSinkError):
        sink.append(event(1))  # fills the batch; its put fails
    with pytest.raises(AuditSinkError):
        sink.append(event(2))  # the buffer is full, the flush fails again, yet this event is buffered too
    assert sink.pending == 3
    injector.enabled = False
    sink.close()
    assert [d["scope_key"] for d in read_back(logs, group, "s")] == ["scope-0", "scope-1", "scope-2"]
