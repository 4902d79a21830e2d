"""Windows and streaming: PartitionBatches, and encryption per (partition, window) scope.

A DEK scope is one partition within one bundle *and window*, so in a windowed
pipeline every audit event belongs to exactly one window and is emitted into
it. The streaming test drives the DirectRunner with a `TestStream`: records
arrive over (simulated) processing time and event time, the watermark closes
windows, PartitionBatches gathers each partition's records per window, and
EncryptBatches/DecryptBatches run on the result.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Tuple

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to, equal_to_per_window
from apache_beam.transforms import window
from apache_beam.transforms.window import IntervalWindow, TimestampedValue

from beam_support import (
    DATASET,
    SENSITIVE,
    batch_pipeline,
    counters,
    key_source,  # noqa: F401  (fixture)
    matches,
    no_batch_pickling,  # noqa: F401  (fixture)
    read_jsonl,
    rows_of,
    run_pipeline,
    sample_batch,
    write_jsonl,
)
from keyturn.transforms.arrow import DecryptBatches, EncryptBatches
from keyturn.transforms.coders import RecordBatchCoder
from keyturn.transforms.partition import PartitionBatches

pytestmark = pytest.mark.beam

Keyed = Tuple[str, pa.RecordBatch]
KEYED_CODER = beam.coders.TupleCoder([beam.coders.StrUtf8Coder(), RecordBatchCoder()])


def window_span(w: Any) -> tuple[int, int]:
    """An IntervalWindow as (start, end) in whole seconds."""
    return int(w.start.micros // 1_000_000), int(w.end.micros // 1_000_000)


class WithWindow(beam.DoFn):
    """Tags each element with the window Beam put it in: (start, end), element."""

    def process(self, element: Any, w: Any = beam.DoFn.WindowParam) -> Any:
        yield window_span(w), element


class RowsWithWindow(beam.DoFn):
    """One (window (start, end), partition, *row) tuple per row of a keyed batch (no batch leaves this step)."""

    def process(self, element: tuple[str, pa.RecordBatch], w: Any = beam.DoFn.WindowParam) -> Any:
        for row in row_tuples(element):
            yield (window_span(w), *row)


def row_tuples(element: tuple[str, pa.RecordBatch]) -> list[tuple[Any, ...]]:
    partition, batch = element
    return [(partition, *row) for row in rows_of(batch)]


# --------------------------------------------------------------------------- PartitionBatches


def _timestamped_inputs(
    parts: tuple[str, ...], batches: int, rows: int, seconds_apart: int
) -> list[tuple[int, str, pa.RecordBatch]]:
    """(event time, partition, batch) with distinct ids; batch b of each partition at time b * seconds_apart."""
    out = []
    next_id = 0
    for b in range(batches):
        for p in parts:
            out.append((b * seconds_apart, p, sample_batch(rows, start=next_id, region=p)))
            next_id += rows
    return out


@pytest.mark.parametrize("max_rows", [1, 7, 1000])
def test_partition_batches_bounds_size_keeps_rows_and_respects_windows(max_rows, no_batch_pickling):
    inputs = _timestamped_inputs(("p1", "p2"), batches=12, rows=3, seconds_apart=10)  # windows of 60s: 6 batches each
    expected = [((t // 60 * 60, t // 60 * 60 + 60), p, *row) for t, p, b in inputs for row in rows_of(b)]
    input_batches = len(inputs)

    def sizes_ok(sizes: list[int]) -> None:
        assert sizes and max(sizes) <= max_rows, f"a batch exceeds max_rows={max_rows}: {max(sizes)}"
        if max_rows > 3:
            assert len(sizes) < input_batches, "small batches were not gathered"

    with batch_pipeline() as p:
        grouped = (
            p
            | beam.Create(inputs)
            | "Stamp" >> beam.Map(lambda e: TimestampedValue((e[1], e[2]), e[0])).with_output_types(Keyed)
            | "Window" >> beam.WindowInto(window.FixedWindows(60))
            | PartitionBatches(max_rows=max_rows, max_batches=4)
        )
        assert_that(
            grouped | "Rows" >> beam.ParDo(RowsWithWindow()),
            equal_to(expected),
            label="EveryRowOnceInItsWindow",
        )
        assert_that(grouped | "Sizes" >> beam.Map(lambda kv: kv[1].num_rows), matches(sizes_ok), label="SizeBound")


def test_partition_batches_then_encrypt_gives_one_scope_per_partition_and_window(
    key_source, tmp_path, no_batch_pickling
):
    inputs = _timestamped_inputs(("p1", "p2"), batches=9, rows=4, seconds_apart=10)  # 3 windows of 30s
    per_scope: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
    for t, p, b in inputs:
        per_scope[(p, (t // 30 * 30, t // 30 * 30 + 30))] += b.num_rows

    def build(p: beam.Pipeline) -> None:
        grouped = (
            p
            | beam.Create(inputs)
            | "Stamp" >> beam.Map(lambda e: TimestampedValue((e[1], e[2]), e[0])).with_output_types(Keyed)
            | "Window" >> beam.WindowInto(window.FixedWindows(30))
            | PartitionBatches(max_rows=5, max_batches=100)
        )
        enc = grouped | EncryptBatches(key_source, DATASET, SENSITIVE)
        dec = enc.main | DecryptBatches(key_source, DATASET)
        audit = enc.audit | "AuditWindow" >> beam.ParDo(WithWindow())
        write_jsonl(
            audit | "AuditJson" >> beam.Map(lambda we: json.dumps([we[0], we[1]])), tmp_path / "audit", "WriteAudit"
        )
        back = dec.main | "DecWindow" >> beam.ParDo(RowsWithWindow())
        write_jsonl(
            back | "RowJson" >> beam.Map(lambda r: json.dumps([r[0], r[1], r[2]])),
            tmp_path / "rows",
            "WriteRows",
        )

    c = counters(run_pipeline(build))
    audit = [json.loads(line) for line in read_jsonl(tmp_path / "audit")]
    seen = sorted((e["partition"], tuple(span), e["counts"]["rows"]) for span, e in audit)
    assert seen == sorted((p, span, rows) for (p, span), rows in per_scope.items())
    # Each (partition, window) is its own scope with its own DEK, even inside one bundle.
    assert c["deks_generated"] == len(per_scope) == sum(e["counts"]["deks"] for _, e in audit)
    rows_back = sorted(
        tuple(json.loads(line)[0]) + (json.loads(line)[1], json.loads(line)[2])
        for line in read_jsonl(tmp_path / "rows")
    )
    expected_rows = sorted(
        (t // 30 * 30, t // 30 * 30 + 30, p, i) for t, p, b in inputs for i in b.column("id").to_pylist()
    )
    assert rows_back == expected_rows


def test_partition_batches_never_pickles_batches(no_batch_pickling):
    """GroupIntoBatches buffers elements in state with FastPrimitivesCoder (whatever the input type).

    That coder pickles objects it does not know, such as record batches;
    PartitionBatches must keep batches out of pickle anyway. With pickling
    of batches made to fail, the pipeline still runs and keeps every row.
    (The input must be typed: Beam samples element sizes with each
    PCollection's own coder, so an untyped PCollection of batches would be
    pickled by the user's step, before PartitionBatches.)
    """
    inputs = [("p1", sample_batch(3, start=0)), ("p2", sample_batch(4, start=3)), ("p1", sample_batch(2, start=7))]
    with batch_pipeline() as p:
        gathered = p | beam.Create(inputs) | PartitionBatches(max_rows=4)
        assert_that(
            gathered | "Rows" >> beam.FlatMap(row_tuples),
            equal_to([(q, *r) for q, b in inputs for r in rows_of(b)]),
            label="AllRows",
        )
        assert_that(
            gathered | "Sizes" >> beam.Map(lambda kv: (kv[0], kv[1].num_rows)),
            equal_to([("p1", 4), ("p1", 1), ("p2", 4)]),
            label="Sizes",
        )


# --------------------------------------------------------------------------- TestStream


def test_streaming_encrypt_decrypt_per_window(key_source, no_batch_pickling):
    """Records arrive over time; each window's data is gathered, encrypted and audited in that window."""

    def tv(partition: str, start: int, rows: int, at: int) -> TimestampedValue:
        return TimestampedValue((partition, sample_batch(rows, start=start, region=partition)), at)

    arrivals = [
        # (event time, partition, first id, rows)
        (1, "p1", 0, 4),
        (2, "p2", 100, 3),
        (4, "p1", 4, 5),
        (12, "p2", 103, 2),
        (15, "p1", 9, 6),
        (23, "p1", 15, 3),
        (25, "p2", 105, 4),
        (27, "p2", 109, 1),
    ]
    stream = (
        test_stream.TestStream(coder=KEYED_CODER)
        .advance_watermark_to(0)
        .add_elements([tv("p1", 0, 4, 1), tv("p2", 100, 3, 2)])
        .advance_processing_time(5)
        .add_elements([tv("p1", 4, 5, 4), tv("p2", 103, 2, 12)])
        .advance_watermark_to(10)  # closes [0, 10)
        .advance_processing_time(5)
        .add_elements([tv("p1", 9, 6, 15), tv("p1", 15, 3, 23)])
        .advance_watermark_to(20)  # closes [10, 20)
        .advance_processing_time(5)
        .add_elements([tv("p2", 105, 4, 25), tv("p2", 109, 1, 27)])
        .advance_watermark_to(30)  # closes [20, 30) before the end of the stream
        .advance_watermark_to_infinity()
    )
    per_scope: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
    expected_rows: dict[IntervalWindow, list] = defaultdict(list)
    for at, p, start, rows in arrivals:
        span = (at // 10 * 10, at // 10 * 10 + 10)
        per_scope[(p, span)] += rows
        expected_rows[IntervalWindow(*span)].extend((p, *r) for r in rows_of(sample_batch(rows, start=start, region=p)))
    expected_audit = sorted((span, p, rows, 1) for (p, span), rows in per_scope.items())
    max_rows = 5

    def sizes_ok(sizes: list[int]) -> None:
        assert sizes and max(sizes) <= max_rows, f"batch sizes {sizes} exceed max_rows={max_rows}"
        assert sum(sizes) == sum(rows for *_, rows in arrivals)

    options = PipelineOptions(flags=[])
    options.view_as(StandardOptions).streaming = True
    with test_pipeline.TestPipeline(options=options) as p:
        windowed = p | stream | "Window" >> beam.WindowInto(window.FixedWindows(10)).with_output_types(Keyed)
        gathered = windowed | PartitionBatches(max_rows=max_rows, max_batches=100, max_buffering_secs=None)
        enc = gathered | EncryptBatches(key_source, DATASET, SENSITIVE)
        dec = enc.main | DecryptBatches(key_source, DATASET)

        assert_that(gathered | "Sizes" >> beam.Map(lambda kv: kv[1].num_rows), matches(sizes_ok), label="SizeBound")
        assert_that(
            enc.audit
            | "AuditWindows" >> beam.ParDo(WithWindow())
            | "AuditView"
            >> beam.Map(lambda we: (we[0], we[1]["partition"], we[1]["counts"]["rows"], we[1]["counts"]["deks"])),
            equal_to(expected_audit),
            label="OneAuditEventPerPartitionAndWindow",
        )
        assert_that(
            dec.audit
            | "DecAuditWindows" >> beam.ParDo(WithWindow())
            | "DecView" >> beam.Map(lambda we: (we[0], we[1]["partition"], we[1]["counts"]["current"])),
            equal_to(sorted((span, p, rows) for (p, span), rows in per_scope.items())),
            label="DecryptAuditPerWindow",
        )
        assert_that(
            dec.main | "Rows" >> beam.FlatMap(row_tuples),
            equal_to_per_window(dict(expected_rows)),
            use_global_window=False,
            label="DecryptEqualsInputPerWindow",
        )
        assert_that(enc.version_mismatch, equal_to([]), label="NoMismatch")
        assert_that(dec.quarantine, equal_to([]), label="NoQuarantine")

    # No metric assertions here: the BundleBasedDirectRunner that runs TestStream pipelines reports no
    # counters for steps downstream of a timer-driven stateful DoFn (GroupIntoBatches). The audit events
    # above carry the same accounting (rows and DEKs per scope).
