"""Benchmark 2: keyturn inside Beam.

Both parts use a real file key home in a temporary directory: a root key
file (`generate_root_key_file`), a `LocalKms` keystore sealed under it with
one KEK, and a `SqliteKeyRegistry` whose version 1 is that KEK; DoFns get a
picklable `LocalKeySource` and open the KMS and registry in `setup()`.

Data: `(partition, RecordBatch)` elements with columns `id` (int64),
`email` (string, 16..32 random bytes, encrypted) and `amount` (float64),
from a fixed seed; partition i of n is `p<i>`.

**Overhead** (`run_overhead`): rows/s of `EncryptBatches` on the
DirectRunner (in-process FnApiRunner, one worker, batch mode) over
`rows / batch_rows` batches spread round-robin over `partitions`, against the
plain core loop over the same batches in the same order with the same
partitioning (one `DekScope` per partition, `encrypt_batch` per batch, KMS and
policy opened from the same key home before timing). Both start from the same
pre-built in-memory batches: the pipeline's source is `Create(range(n))` and
a `Map` that returns batch i from a process-local table (this works because
the runner executes in this process), so neither side pays to build data and
the batches are never embedded in the pipeline graph. The pipeline run is
timed from construction to `wait_until_finish()`, so it includes Beam's own
start-up; an identity pipeline (same source and sink, `Map(identity)` instead
of `EncryptBatches`) is timed in the same rounds to show that fixed cost.

**Streaming KMS calls** (`run_streaming`): a streaming pipeline on the
DirectRunner: a `TestStream` delivers `records` rows as micro-batches of
`source_rows` rows, one per partition per arrival, with event time and
processing time advancing by `source_rows / rate` seconds per arrival
(`rate` rows/s per partition); `PartitionBatches(max_rows=batch_rows)`
regroups them (default buffering of 10 s) and `EncryptBatches` encrypts.
KMS calls are counted three ways: by a tally inside the KMS the DoFn opens
(ground truth), from the audit events (one per scope, listing its KMS request
ids), and from the `keyturn` metrics counters in the pipeline result. The
same stream without `PartitionBatches` is the baseline.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from benchmarks.common import measure_rounds, profile_top, random_strings, rate, ratio, time_once
from keyturn.arrow_codec import encrypt_batch
from keyturn.keysource import LocalKeySource
from keyturn.kms.base import GeneratedDataKey, KmsBackend, RewrappedDataKey, UnwrappedDataKey
from keyturn.kms.local import LocalKms, generate_root_key_file
from keyturn.policy import KeyPolicy
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.scope import DekScope, Location
from keyturn.transforms.arrow import EncryptBatches
from keyturn.transforms.partition import PartitionBatches

__all__ = [
    "run_overhead",
    "run_streaming",
    "build_key_home",
    "make_batch",
    "OVERHEAD_TARGET",
    "STREAMING_TARGET_PER_PARTITION",
    "run_workers",
    "WORKERS_TARGET",
]

DATASET = "bench"
COLUMNS = ("email",)
KEK_ID = "bench-kek-1"
SEED = 20240602
OVERHEAD_TARGET = 0.7  # pipeline rows/s over core-loop rows/s
STREAMING_TARGET_PER_PARTITION = 100  # KMS calls per partition per 1M records
Keyed = Tuple[str, pa.RecordBatch]

# Process-local state shared with DoFns. The DirectRunner runs them in this
# process, so a DoFn pickled by reference (module-level function) sees these.
_LOCK = threading.Lock()
_BATCHES: dict[str, list[tuple[str, pa.RecordBatch]]] = {}
_KMS_TALLY: Counter[str] = Counter()
_AUDIT: dict[str, list[tuple[str, int]]] = defaultdict(list)
_ROWS: Counter[str] = Counter()


# --------------------------------------------------------------------------- key home and data


def build_key_home(directory: str) -> LocalKeySource:
    """A root key file, a LocalKms keystore with one KEK, and a registry with version 1 active."""
    key_file = generate_root_key_file(os.path.join(directory, "root.key"))
    keystore = os.path.join(directory, "keystore.json")
    with LocalKms.create(keystore, key_file=key_file) as kms:
        kms.create_kek(KEK_ID)
    registry = os.path.join(directory, "registry.sqlite")
    SqliteKeyRegistry(registry).initialize(KEK_ID, actor="bench", reason="benchmark key home")
    return LocalKeySource(keystore=keystore, registry=registry, key_file=key_file)


def make_batch(index: int, rows: int, partitions: int, seed: int = SEED) -> tuple[str, pa.RecordBatch]:
    """Batch `index` (deterministic): `rows` rows for partition `p<index % partitions>`."""
    rng = np.random.default_rng([seed, index])
    start = index * rows
    batch = pa.record_batch(
        [
            pa.array(np.arange(start, start + rows, dtype=np.int64)),
            random_strings(rows, rng),
            pa.array(rng.random(rows)),
        ],
        names=["id", "email", "amount"],
    )
    return f"p{index % partitions}", batch


# --------------------------------------------------------------------------- DoFn helpers (module level: pickled by reference)


def _fetch(index: int, token: str) -> tuple[str, pa.RecordBatch]:
    return _BATCHES[token][index]


def _identity(element: Any) -> Any:
    return element


def _count_rows(element: tuple[str, pa.RecordBatch], token: str) -> None:
    with _LOCK:
        _ROWS[token] += element[1].num_rows


def _collect_audit(event: Mapping[str, Any], token: str) -> None:
    with _LOCK:
        _AUDIT[token].append((event["partition"], len(event["kms_request_ids"])))


@dataclass(frozen=True)
class _MicroBatch:
    """Builds streaming micro-batch i inside the pipeline (deterministic, cheap to pickle)."""

    rows: int
    partitions: int
    seed: int

    def __call__(self, index: int) -> tuple[str, pa.RecordBatch]:
        return make_batch(index, self.rows, self.partitions, self.seed)


class _TallyKms:
    """A KMS that counts GenerateDataKey calls in a process-wide tally (in-process runners only)."""

    def __init__(self, inner: KmsBackend, token: str) -> None:
        self._inner = inner
        self._token = token

    def generate_data_key(self, kek_id: str, context: Mapping[str, str]) -> GeneratedDataKey:
        result = self._inner.generate_data_key(kek_id, context)
        with _LOCK:
            _KMS_TALLY[self._token] += 1
        return result

    def decrypt(self, kek_id: str, wrapped: bytes, context: Mapping[str, str]) -> UnwrappedDataKey:
        return self._inner.decrypt(kek_id, wrapped, context)

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> RewrappedDataKey:
        return self._inner.rewrap(wrapped, **kwargs)


@dataclass(frozen=True)
class _TallyKeySource:
    """The real LocalKeySource, with its KMS wrapped in `_TallyKms`."""

    inner: LocalKeySource
    token: str

    def open_kms(self) -> KmsBackend:
        return _TallyKms(self.inner.open_kms(), self.token)

    def open_registry(self) -> Any:
        return self.inner.open_registry()


def _counters(result: Any, namespace: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def _batch_options() -> PipelineOptions:
    return PipelineOptions(flags=[], runner="DirectRunner", direct_num_workers=1, direct_running_mode="in_memory")


def _core_loop(
    kms: KmsBackend, policy: KeyPolicy, batches: Iterable[tuple[str, pa.RecordBatch]], deks: list[int] | None = None
) -> int:
    """The work without Beam: `encrypt_batch` per batch, one `DekScope` per partition (all closed at
    the end; their DEKs generated appended to `deks` when given). Returns the rows encrypted."""
    scopes: dict[str, DekScope] = {}
    n = 0
    try:
        for partition, batch in batches:
            scope = scopes.get(partition)
            if scope is None:
                scope = scopes[partition] = DekScope(kms, policy.active, Location(DATASET, partition))
            n += encrypt_batch(batch, COLUMNS, scope).num_rows
    finally:
        if deks is not None:
            deks.append(sum(s.stats.deks_generated for s in scopes.values()))
        for s in scopes.values():
            s.close()
    return n


# --------------------------------------------------------------------------- overhead


def run_overhead(
    *,
    rows: int = 1_000_000,
    batch_rows: int = 10_000,
    partitions: int = 10,
    runs: int = 5,
    warmup: int = 1,
    seed: int = SEED,
    profile: bool = True,
) -> dict[str, Any]:
    """EncryptBatches on the DirectRunner vs the core loop over the same batches."""
    if rows % batch_rows:
        raise ValueError("rows must be a multiple of batch_rows")
    n_batches = rows // batch_rows
    token = uuid.uuid4().hex
    _BATCHES[token] = [make_batch(i, batch_rows, partitions, seed) for i in range(n_batches)]
    batches = _BATCHES[token]
    try:
        with tempfile.TemporaryDirectory(prefix="keyturn-bench-") as home:
            keys = build_key_home(home)
            kms = keys.open_kms()
            policy = KeyPolicy.from_registry(keys.open_registry())
            core_calls: list[int] = []

            def core() -> int:
                return _core_loop(kms, policy, batches, core_calls)

            pipeline_metrics: list[dict[str, int]] = []

            def pipeline(encrypt: bool) -> int:
                run_token = uuid.uuid4().hex
                p = beam.Pipeline(options=_batch_options())
                source = (
                    p
                    | "Indices" >> beam.Create(list(range(n_batches)))
                    | "Fetch" >> beam.Map(_fetch, token).with_output_types(Keyed)
                )
                if encrypt:
                    out = (source | "Encrypt" >> EncryptBatches(keys, DATASET, COLUMNS)).main
                else:
                    out = source | "Identity" >> beam.Map(_identity).with_output_types(Keyed)
                out | "Count" >> beam.Map(_count_rows, run_token)
                result = p.run()
                result.wait_until_finish()
                if encrypt:
                    pipeline_metrics.append(_counters(result, "keyturn"))
                with _LOCK:
                    return _ROWS.pop(run_token, 0)

            def check(name: str, n: int) -> None:
                if n != rows:
                    raise AssertionError(f"{name} produced {n} rows, expected {rows}")

            timings = measure_rounds(
                {"core": core, "identity_pipeline": lambda: pipeline(False), "pipeline": lambda: pipeline(True)},
                runs=runs,
                warmup=warmup,
                check=check,
            )
            mark = len(pipeline_metrics)
            prof = profile_top(lambda: pipeline(True), top=15, repeat=2) if profile else None
            del pipeline_metrics[mark:]
    finally:
        _BATCHES.pop(token, None)

    core_t, pipe_t, ident_t = timings["core"], timings["pipeline"], timings["identity_pipeline"]
    end_to_end = ratio(pipe_t, core_t)
    marginal = [c / max(p - i, 1e-9) for c, p, i in zip(core_t.runs, pipe_t.runs, ident_t.runs)]
    last = pipeline_metrics[-1] if pipeline_metrics else {}
    result: dict[str, Any] = {
        "name": "beam_overhead",
        "params": {
            "rows": rows,
            "batch_rows": batch_rows,
            "batches": n_batches,
            "partitions": partitions,
            "encrypted_columns": list(COLUMNS),
            "seed": seed,
            "runs": runs,
            "warmup": warmup,
            "runner": "DirectRunner (FnApiRunner in-process, direct_num_workers=1, batch)",
        },
        "core": core_t.to_dict(),
        "pipeline": pipe_t.to_dict(),
        "identity_pipeline": ident_t.to_dict(),
        "core_rows_per_s": rate(rows, core_t),
        "pipeline_rows_per_s": rate(rows, pipe_t),
        "ratio": end_to_end.to_dict(),
        "ratio_without_fixed_cost": {
            "per_round": [round(v, 4) for v in marginal],
            "median": round(float(np.median(marginal)), 4),
            "min": round(min(marginal), 4),
            "max": round(max(marginal), 4),
            "definition": "core time / (pipeline time - identity pipeline time), per round",
        },
        "target": OVERHEAD_TARGET,
        "met": end_to_end.median >= OVERHEAD_TARGET,
        "kms": {
            "core_calls_per_run": core_calls,
            "pipeline_counters_last_run": last,
            "pipeline_kms_calls_per_run": [m.get("kms_calls", 0) for m in pipeline_metrics],
        },
    }
    if prof is not None:
        result["profile"] = {"total_s": prof["total_s"], "top": prof["top"]}
    return result


# --------------------------------------------------------------------------- streaming


def _stream_pipeline(
    keys: LocalKeySource,
    *,
    records: int,
    source_rows: int,
    partitions: int,
    batch_rows: int | None,
    rate_per_partition: float,
    seed: int,
) -> dict[str, Any]:
    """Run one streaming pipeline; batch_rows=None leaves PartitionBatches out."""
    token = uuid.uuid4().hex
    elements = records // source_rows
    step = source_rows / rate_per_partition  # seconds between arrivals
    stream = TestStream()
    arrivals = 0
    for k, first in enumerate(range(0, elements, partitions)):
        stream = stream.add_elements([TimestampedValue(i, k * step) for i in range(first, min(elements, first + partitions))])
        stream = stream.advance_watermark_to((k + 1) * step).advance_processing_time(step)
        arrivals += 1
    stream = stream.advance_watermark_to_infinity()

    options = PipelineOptions(flags=[], runner="DirectRunner", streaming=True)
    p = beam.Pipeline(options=options)
    source = p | "Stream" >> stream | "Build" >> beam.Map(_MicroBatch(source_rows, partitions, seed)).with_output_types(Keyed)
    if batch_rows is not None:
        source = source | "Regroup" >> PartitionBatches(max_rows=batch_rows, max_batches=max(1, batch_rows // source_rows))
    out = source | "Encrypt" >> EncryptBatches(_TallyKeySource(keys, token), DATASET, COLUMNS)
    out.main | "Count" >> beam.Map(_count_rows, token)
    out.audit | "Audit" >> beam.Map(_collect_audit, token)
    wall, result = time_once(lambda: _run_and_wait(p))
    counters = _counters(result, "keyturn")
    with _LOCK:
        tally = _KMS_TALLY.pop(token, 0)
        audit = _AUDIT.pop(token, [])
        rows_out = _ROWS.pop(token, 0)
    if rows_out != records:
        raise AssertionError(f"streaming pipeline encrypted {rows_out} rows, expected {records}")
    per_partition: Counter[str] = Counter()
    scopes: Counter[str] = Counter()
    for partition, calls in audit:
        per_partition[partition] += calls
        scopes[partition] += 1
    if sum(per_partition.values()) != tally:
        raise AssertionError(f"audit events list {sum(per_partition.values())} KMS calls, the KMS saw {tally}")
    values = [per_partition.get(f"p{i}", 0) for i in range(partitions)]
    return {
        "partition_batches": batch_rows is not None,
        "wall_s": round(wall, 3),
        "elements": elements,
        "arrivals": arrivals,
        "kms_calls_total": tally,
        "kms_calls_per_partition": {f"p{i}": per_partition.get(f"p{i}", 0) for i in range(partitions)},
        "kms_calls_per_partition_max": max(values),
        "kms_calls_per_partition_mean": sum(values) / partitions,
        "kms_calls_per_1m_records": tally * 1_000_000 / records,
        "scopes": sum(scopes.values()),
        "audit_kms_calls": sum(per_partition.values()),
        "runner_counters": counters,
    }


def _run_and_wait(p: beam.Pipeline) -> Any:
    result = p.run()
    result.wait_until_finish()
    return result


def run_streaming(
    *,
    records: int = 1_000_000,
    source_rows: int = 100,
    batch_rows: int = 10_000,
    partitions: int = 10,
    rate_per_partition: float = 1_000.0,
    seed: int = SEED,
    baseline: bool = True,
) -> dict[str, Any]:
    """KMS calls per partition for `records` rows through PartitionBatches + EncryptBatches, streaming."""
    if records % (source_rows * partitions):
        raise ValueError("records must be a multiple of source_rows * partitions")
    with tempfile.TemporaryDirectory(prefix="keyturn-bench-") as home:
        keys = build_key_home(home)
        started = time.perf_counter()
        grouped = _stream_pipeline(
            keys,
            records=records,
            source_rows=source_rows,
            partitions=partitions,
            batch_rows=batch_rows,
            rate_per_partition=rate_per_partition,
            seed=seed,
        )
        naive = (
            _stream_pipeline(
                keys,
                records=records,
                source_rows=source_rows,
                partitions=partitions,
                batch_rows=None,
                rate_per_partition=rate_per_partition,
                seed=seed,
            )
            if baseline
            else None
        )
        elapsed = time.perf_counter() - started
    worst = grouped["kms_calls_per_partition_max"]
    return {
        "name": "beam_streaming",
        "params": {
            "records": records,
            "partitions": partitions,
            "source_rows": source_rows,
            "batch_rows": batch_rows,
            "partition_batches": f"PartitionBatches(max_rows={batch_rows}, max_batches={max(1, batch_rows // source_rows)}), default max_buffering_secs",
            "rate_rows_per_s_per_partition": rate_per_partition,
            "seconds_per_arrival": source_rows / rate_per_partition,
            "runner": "DirectRunner, streaming=True (TestStream)",
            "seed": seed,
        },
        "with_partition_batches": grouped,
        "without_partition_batches": naive,
        "reduction": (naive["kms_calls_total"] / grouped["kms_calls_total"]) if naive and grouped["kms_calls_total"] else None,
        "target_per_partition": STREAMING_TARGET_PER_PARTITION,
        "met": worst <= STREAMING_TARGET_PER_PARTITION,
        "elapsed_s": round(elapsed, 2),
    }


# --------------------------------------------------------------------------- workers (1 vs 2 processes)

WORKERS_TARGET = 1.6  # rows/s with 2 worker processes over rows/s with 1 worker


def _num_rows(element: tuple[str, pa.RecordBatch]) -> int:
    return element[1].num_rows


def _write_total(total: int, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(str(total))


def _workers_pipeline(keys: LocalKeySource, n_batches: int, maker: _MicroBatch, options: PipelineOptions, out_path: str) -> int:
    p = beam.Pipeline(options=options)
    (
        p
        | "Indices" >> beam.Create(list(range(n_batches)))
        | "Spread" >> beam.Reshuffle()
        | "Build" >> beam.Map(maker)
        | "Encrypt" >> EncryptBatches(keys, DATASET, COLUMNS)
    ).main | "Rows" >> beam.Map(_num_rows) | "Sum" >> beam.CombineGlobally(sum) | "Write" >> beam.Map(_write_total, out_path)
    p.run().wait_until_finish()
    with open(out_path, encoding="utf-8") as fh:
        return int(fh.read())


def run_workers(
    *,
    rows: int = 1_000_000,
    batch_rows: int = 10_000,
    partitions: int = 10,
    runs: int = 5,
    warmup: int = 1,
    seed: int = SEED,
) -> dict[str, Any]:
    """EncryptBatches rows/s on the FnApiRunner with 1 worker (in-process) and 2 worker processes."""
    if rows % batch_rows:
        raise ValueError("rows must be a multiple of batch_rows")
    n_batches = rows // batch_rows
    maker = _MicroBatch(batch_rows, partitions, seed)
    with tempfile.TemporaryDirectory(prefix="keyturn-bench-") as home:
        keys = build_key_home(home)
        out_path = os.path.join(home, "rows.txt")
        one = PipelineOptions(flags=[], runner="DirectRunner", direct_num_workers=1, direct_running_mode="in_memory")
        two = PipelineOptions(flags=[], runner="DirectRunner", direct_num_workers=2, direct_running_mode="multi_processing")
        # the same work without Beam: build and encrypt every batch in this process
        kms = keys.open_kms()
        policy = KeyPolicy.from_registry(keys.open_registry())

        def core() -> int:
            return _core_loop(kms, policy, (maker(i) for i in range(n_batches)))

        def check(name: str, n: int) -> None:
            if n != rows:
                raise AssertionError(f"{name}: {n} rows, expected {rows}")

        timings = measure_rounds(
            {
                "one_worker": lambda: _workers_pipeline(keys, n_batches, maker, one, out_path),
                "two_workers": lambda: _workers_pipeline(keys, n_batches, maker, two, out_path),
                "core": core,
            },
            runs=runs,
            warmup=warmup,
            check=check,
        )
        close = getattr(kms, "close", None)
        if close is not None:
            close()
    speedup = ratio(timings["two_workers"], timings["one_worker"])
    return {
        "name": "beam_workers",
        "params": {
            "rows": rows,
            "batch_rows": batch_rows,
            "batches": n_batches,
            "partitions": partitions,
            "runs": runs,
            "warmup": warmup,
            "seed": seed,
            "one_worker": "DirectRunner (FnApiRunner), direct_num_workers=1, direct_running_mode=in_memory",
            "two_workers": "DirectRunner (FnApiRunner), direct_num_workers=2, direct_running_mode=multi_processing",
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "one_worker": timings["one_worker"].to_dict(),
        "two_workers": timings["two_workers"].to_dict(),
        "core": timings["core"].to_dict(),
        "one_worker_rows_per_s": rate(rows, timings["one_worker"]),
        "two_workers_rows_per_s": rate(rows, timings["two_workers"]),
        "core_rows_per_s": rate(rows, timings["core"]),
        "speedup": speedup.to_dict(),
        "target": WORKERS_TARGET,
        "met": speedup.median >= WORKERS_TARGET,
    }
